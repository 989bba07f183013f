#!/bin/sh
# Install Debian's WenQuanYi Micro Hei font, whose Chinese, Japanese and Korean characters the
# PNG figure test checks (tests/service/test_plots.py).
# Best effort: without root, apt-get or a package mirror this exits 0, and that test skips.
# matplotlib lists the fonts once and caches the list: a list built before the install lacks
# the font, so it is removed and matplotlib builds it again on its next start.
forget_stale_font_lists() {
    for list in "${MPLCONFIGDIR:-${XDG_CACHE_HOME:-$HOME/.cache}/matplotlib}"/fontlist-*.json; do
        if [ -f "$list" ] && ! grep -q "WenQuanYi" "$list"; then
            rm -f "$list" && echo "removed $list, built before the font was installed"
        fi
    done
}
if fc-list 2>/dev/null | grep -q "WenQuanYi Micro Hei"; then
    echo "WenQuanYi Micro Hei already installed"
    forget_stale_font_lists
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install fonts-wqy-microhei (needs root and apt-get); the CJK figure test will skip"
    exit 0
fi
if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fonts-wqy-microhei \
    || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
        --no-install-recommends fonts-wqy-microhei; }; then
    echo "installed fonts-wqy-microhei"
    forget_stale_font_lists
else
    echo "fonts-wqy-microhei install failed; the CJK figure test will skip"
fi
exit 0
