"""Panel app (Panel + plotly; the core never imports this package). `show(model=...)` in a notebook,
`workbench serve` from the command line. Panel is imported only when these functions are called."""

from __future__ import annotations


def show(model=None, source: str = "default"):
    """The workbench app in a notebook cell (see `workbench.ui.app.show`)."""
    from workbench.ui.app import show as _show

    return _show(model=model, source=source)


def serve(source: str = "default", host: str = "127.0.0.1", port: int = 5006, **kwargs):
    """Serve the workbench app (see `workbench.ui.app.serve`)."""
    from workbench.ui.app import serve as _serve

    return _serve(source=source, host=host, port=port, **kwargs)


__all__ = ["show", "serve"]
