"""GET /v1/datasets: what the service can load, and which datasets have cached palette tokens."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import StoreDep
from service.schemas import DatasetPublic, DatasetsPublic, TokenCachePublic
from workers.datasets import list_datasets
from workers.tokens import list_token_caches

router = APIRouter(prefix="/v1", tags=["datasets"])


@router.get("/datasets", response_model=DatasetsPublic)
def list_dataset_sources(store: StoreDep) -> DatasetsPublic:
    """Dataset references the workers accept, plus the store's cached ImageGPT palette tokens."""
    data = [DatasetPublic.model_validate(entry) for entry in list_datasets()]
    caches = [TokenCachePublic.model_validate(entry) for entry in list_token_caches(store)]
    return DatasetsPublic(data=data, count=len(data), token_caches=caches)
