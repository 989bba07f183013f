"""Typed access to the arrays of a Zarr group."""

from __future__ import annotations

import zarr

from store.errors import LayoutError


def group_array(group: zarr.Group, name: str) -> zarr.Array:
    """Return the array ``name`` of ``group``.

    Raises KeyError when ``group`` has no member ``name``, as indexing the group does, and
    LayoutError when the member is a group rather than an array.
    """
    member = group[name]
    if not isinstance(member, zarr.Array):
        path = f"{group.path}/{name}" if group.path else name
        raise LayoutError(
            f"{path!r} in the store is a Zarr group, but layerbank writes an array there. The "
            f"store is damaged or was written by another program, so delete {group.path!r} from "
            "the store and create it again",
            field=name,
            value=path,
        )
    return member
