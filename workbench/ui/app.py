"""Compose the views into the app; the same object runs in JupyterLab (`show`) and served (`serve`).

`build_app(state)` lays out the header and one tab per view. `serve(...)` gives every browser session its
own `WorkbenchState` (the loaded model itself is shared read-only, see tasks.py), runs long work in job
threads, and cancels a session's jobs when its tab closes.
"""

from __future__ import annotations

import logging
import threading

import panel as pn

from workbench.ui.state import WorkbenchState

_CSS = """
.wb-totals p { font-size: 15px; margin: 4px 0; }
.wb-job { border-bottom: 1px solid #eee; }
"""


def _extension(inline: bool = False) -> None:
    """Load Panel's extensions; `inline` embeds their JavaScript (offline, a notebook has no CDN)."""
    pn.extension(
        "tabulator", "plotly", raw_css=[_CSS], notifications=False, sizing_mode="stretch_width", inline=inline
    )


def build_app(state: WorkbenchState) -> pn.viewable.Viewable:
    """The whole app for one state: header, then tabs Model / Plan / Distributions / Sensitivity /
    Transforms / Measure & run / Cache / Chat."""
    from workbench.ui.views.header import HeaderView
    from workbench.ui.views.model_view import ModelView
    from workbench.ui.views.plan_view import PlanView

    views = [ModelView(state=state), PlanView(state=state)]
    for module, cls in (
        ("distributions_view", "DistributionsView"),
        ("sensitivity_view", "SensitivityView"),
        ("transforms_view", "TransformsView"),
        ("measure_view", "MeasureView"),
        ("cache_view", "CacheView"),
        ("chat_view", "ChatView"),
    ):
        try:
            mod = __import__(f"workbench.ui.views.{module}", fromlist=[cls])
        except ModuleNotFoundError as exc:
            if exc.name != f"workbench.ui.views.{module}":
                raise
            continue
        views.append(getattr(mod, cls)(state=state))

    built: list[pn.Tabs] = []

    def body(phase):
        if phase != "ready" and not built:
            return pn.pane.HTML("", height=0)
        if not built:  # built once: the views follow later models through the state's params
            panels = [v.panel() for v in views]
            built.append(
                pn.Tabs(*[(p.name, p) for p in panels], sizing_mode="stretch_width", css_classes=["wb-tabs"])
            )
        return built[0]

    app = pn.Column(
        HeaderView(state=state).panel(),
        pn.bind(body, state.param.phase),
        sizing_mode="stretch_width",
        css_classes=["wb-app"],
    )
    app.state = state
    return app


def session_dispatcher():
    """In a served session: a function that runs `fn()` on the session's event loop (document lock held).

    Job threads hand their results over through it (`WorkbenchState.run_ui`): Panel panes such as Plotly
    replace Bokeh models directly when their object changes, which Bokeh only allows under the lock.
    None outside a server session (notebooks, tests), where results are applied directly.
    """
    from panel.io.state import set_curdoc

    doc = pn.state.curdoc
    if doc is None or doc.session_context is None:
        return None

    def dispatch(fn):
        def run():
            with set_curdoc(doc):
                fn()

        try:
            doc.add_next_tick_callback(run)
        except Exception:  # the session is gone (tab closed): nothing left to update
            pass

    return dispatch


def create_app(
    model=None, source: str = "default", load: bool = True, dispatcher=None, inline: bool = False
) -> pn.viewable.Viewable:
    """A new state and its app. `model` may be a LoadedModel (used as is) or a source string."""
    _extension(inline)
    dispatcher = dispatcher or session_dispatcher()
    state = WorkbenchState(source=source if not isinstance(model, str) else model, dispatcher=dispatcher)
    if model is not None and not isinstance(model, str):
        state.set_model(model)
    elif load:
        state.load()
    return build_app(state)


def show(model=None, source: str = "default") -> pn.viewable.Viewable:
    """The app in a notebook cell: `workbench.ui.show()` (default model) or `show(model=loaded_or_source)`.

    Panel's browser code is embedded in the notebook (inline resources): by default Panel loads it from a
    CDN, and offline the app would stay an empty, zero-height area.
    """
    return create_app(model=model, source=source, inline=True)


def _preload(load, source: str) -> None:
    try:
        load(source)
    except Exception as exc:  # the session's own load job reports the error to the user
        logging.getLogger("workbench").info("preloading '%s' failed: %s", source, exc)


def serve(
    source: str = "default",
    host: str = "127.0.0.1",
    port: int = 5006,
    show_browser: bool = False,
    threaded: bool = False,
    **kwargs,
):
    """Serve the app; one state per browser session, jobs cancelled when the session ends.

    Binds `host` (127.0.0.1 unless the user asks otherwise). Returns Panel's server object.
    """

    def session():
        app = create_app(source=source)
        state = app.state
        pn.state.on_session_destroyed(lambda _ctx: state.cancel_jobs())
        return app

    _extension()
    logger = logging.getLogger("workbench")
    if not logger.handlers:  # job starts / ends on the server's stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    # Start loading the model now, while the browser is still opening: the first tab then waits less.
    from workbench.ui.tasks import shared_model

    threading.Thread(target=_preload, args=(shared_model, source), daemon=True).start()
    origins = [f"{host}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]
    return pn.serve(
        {"/": session},
        address=host,
        port=port,
        show=show_browser,
        threaded=threaded,
        websocket_origin=origins,
        title="Quant Workbench",
        check_unused_sessions_milliseconds=2000,
        unused_session_lifetime_milliseconds=10000,
        **kwargs,
    )
