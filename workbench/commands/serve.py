"""`workbench serve`: the interactive app in the browser (Panel server, one state per browser tab)."""

from __future__ import annotations

from workbench.commands.common import add_model_arg


def add_parser(sub):
    p = sub.add_parser("serve", help="serve the interactive app (Panel) in the browser")
    add_model_arg(p, required=False)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)",
    )
    p.add_argument("--port", type=int, default=5006, help="port (default 5006; 0 picks a free one)")
    p.add_argument("--show", action="store_true", help="open a browser tab")
    return p


def run(args) -> int:
    from workbench.errors import WorkbenchError

    try:
        from workbench.ui.app import serve
    except ModuleNotFoundError as exc:
        raise WorkbenchError(
            f"the app needs the UI packages ({exc.name} missing): pip install 'quant-workbench[ui]'"
        ) from None
    print(f"workbench serve: http://{args.host}:{args.port}/ (model: {args.model}); Ctrl-C stops", flush=True)
    serve(source=args.model, host=args.host, port=args.port, show_browser=args.show)
    return 0
