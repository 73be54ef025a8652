"""Figure export: interactive HTML always; PNG / SVG / PDF through kaleido and a Chrome/Chromium.

plotly's static export (kaleido >= 1) drives a headless Chrome. It is found, in order, from
``BROWSER_PATH``, then ``chromium``, ``chromium-browser``, ``google-chrome`` on the PATH
(Debian/Ubuntu: ``apt-get install chromium``). Without one, static formats fail with a
clear error and HTML still works.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

FORMATS = ("html", "png", "svg", "pdf")
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chrome() -> str | None:
    """Path of a Chrome/Chromium for static export, or None."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).is_file():
        return env
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def save_figure(fig, path: str | Path, formats: Sequence[str] = ("html",), scale: float = 2.0) -> list[Path]:
    """Write ``fig`` as ``path.<fmt>`` for each format; returns the files written.

    HTML embeds plotly.js, so the file works offline.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"save_figure: formats must be among {FORMATS}, got {bad}")
    stem = Path(path)
    stem = stem.with_suffix("") if stem.suffix.lstrip(".") in FORMATS else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    static = [f for f in formats if f != "html"]
    if static:
        chrome = find_chrome()
        if chrome is None:
            raise RuntimeError("static figure export (png/svg/pdf) needs Chrome or Chromium for plotly's kaleido: "
                               "install it (Debian/Ubuntu: apt-get install chromium) or set BROWSER_PATH; "
                               "HTML export works without it")
    # kaleido finds the browser through BROWSER_PATH: set it for these writes only, so the
    # process's environment is as it was afterwards
    had = "BROWSER_PATH" in os.environ
    if static and not had:
        os.environ["BROWSER_PATH"] = chrome
    try:
        for fmt in formats:
            out = stem.with_suffix(f".{fmt}")
            tmp = out.with_name(f".{out.name}.tmp")
            if fmt == "html":
                fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
            else:
                fig.write_image(str(tmp), format=fmt, scale=scale)
            os.replace(tmp, out)
            written.append(out)
    finally:
        if static and not had:
            os.environ.pop("BROWSER_PATH", None)
    return written
