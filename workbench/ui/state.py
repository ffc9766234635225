"""The app's one state object (Panel's DataStore pattern): model, statistics, plan with undo/redo, results.

`WorkbenchState` owns everything the views show; views take it as a parameter and only lay out widgets.
Every number comes from the core library (`workbench.plan.plan`, `workbench.plan.edit`, `workbench.stats`,
`workbench.measure.sensitivity`, `workbench.plan.allocate`, `workbench.measure.evaluate`,
`workbench.runtime`); this class only
calls it, keeps the results, and publishes derived values through `param` so views update by themselves.

Long computations (loading, statistics, sensitivity, evaluation, chat) run as `Job`s in threads, so the UI
never freezes; `cancel_jobs()` stops them (the served app calls it when the browser tab closes). A job is a
plain function of `workbench/ui/tasks.py` over the session's `ModelSession` (`self.session`: shared model,
private copy, lock) whose result `workbench/ui/adopt.py` hands to this state on the UI thread; this file
holds the data, the plan editor, and `_start`, which wires the two.

Tests drive this class directly, without a browser (tests/test_ui_state.py).
"""

from __future__ import annotations

import json
import time

import param

import workbench.ui.adopt as adopt
import workbench.ui.tasks as tasks
from workbench import defaults
from workbench.errors import WorkbenchError
from workbench.quant.spec import QuantSpec
from workbench.ui.history import History, Snapshot
from workbench.ui.jobs import Job
from workbench.ui.layer_table import TABLE_COLUMNS, layer_table, weight_outliers  # noqa: F401
from workbench.ui.session import ModelSession

# Specs offered in the editor / scanned by the sensitivity view: named presets in workbench.defaults.
CANDIDATE_SPECS, SENSITIVITY_SPECS = defaults.CANDIDATE_SPECS, defaults.SENSITIVITY_SPECS


class WorkbenchState(param.Parameterized):
    """Everything one user session works on. Methods are the verbs of the UI."""

    source = param.String(default="default", doc="model source (default / folder / .gguf / llama2.c .bin)")
    phase = param.Selector(default="empty", objects=["empty", "loading", "ready", "error"])
    loaded = param.Parameter(default=None, doc="LoadedModel")
    description = param.Parameter(default=None, doc="ModelDescription")
    layers = param.List(default=[], doc="list[LayerInfo] in module order")

    plan = param.Parameter(default=None, doc="the current Plan")
    pinned = param.List(default=[], doc="layer names the allocator must not change")
    resolved = param.Dict(default={}, doc="layer -> QuantSpec of the current plan (a plan.ResolvedPlan)")
    totals = param.Parameter(default=None, doc="PlanTotals of the current plan")
    cost = param.Parameter(default=None, doc="PlanCost of the current plan (needs a sensitivity table)")
    table = param.DataFrame(default=None, doc="the layer table shown by the model view")
    revision = param.Integer(default=0, doc="bumped on every plan change")
    can_undo = param.Boolean(default=False)
    can_redo = param.Boolean(default=False)
    edit_seconds = param.Number(default=0.0, doc="time of the last plan edit (resolve + totals + table)")

    selected = param.String(default="", doc="the layer whose distributions are shown")
    grid_spec = param.String(default="", doc="the spec whose grid is drawn ('' = the layer's current spec)")
    details = param.Parameter(
        default=None, doc="LayerReport of the selected layer (workbench.measure.layer_report)"
    )
    inspection = param.Parameter(default=None, doc="activation statistics per layer (stats.cache)")
    sensitivity = param.Parameter(default=None, doc="SensitivityTable")
    kv_stats = param.Parameter(default=None, doc="K/V statistics per attention block (stats.kv.KVStats)")
    verification = param.Parameter(default=None, doc="Verification of the plan last verified (verify.py)")
    evaluations = param.List(default=[], doc="evaluation results, one dict per run")
    chat_log = param.List(default=[], doc="chat results, one dict per prompt")
    jobs = param.List(default=[], doc="Jobs of this session, newest last")

    message = param.String(default="", doc="last notice for the user (errors included)")
    message_kind = param.Selector(default="info", objects=["info", "success", "warning", "error"])
    notifications = param.List(default=[], doc="recent notices, newest last: (HH:MM:SS, kind, text)")
    dispatcher = param.Callable(
        default=None, doc="runs a function on the UI thread (served app); None: call it"
    )

    def __init__(self, **params):
        super().__init__(**params)
        self._history: History | None = None
        self.session: ModelSession | None = None  # the loaded model, its private copy and lock (jobs)
        self._outliers: dict[str, tuple[float, float]] = {}  # layer -> (max/median |w|, kurtosis)

    # ------------------------------------------------------------------ threads
    def run_ui(self, fn) -> None:
        """Run `fn()` where UI state may change: on the session's event loop when served, else right away.

        Jobs hand their results over through this, so views are never re-rendered from a worker thread.
        """
        if self.dispatcher is None:
            fn()
        else:
            self.dispatcher(fn)

    # ------------------------------------------------------------------ notices
    def notify(self, text: str, kind: str = "info") -> None:
        """Show a one-line notice (views display `message` and the last few `notifications`)."""
        with param.parameterized.batch_call_watchers(self):
            self.notifications = self.notifications[-7:] + [(time.strftime("%H:%M:%S"), kind, text)]
            self.message_kind = kind
            self.message = text

    # ------------------------------------------------------------------ loading
    def set_model(self, loaded, outliers: dict | None = None) -> None:
        """Adopt a LoadedModel: inventory, a fresh all-bf16 plan, empty history and caches.

        `outliers`: {layer: (max/median |w|, kurtosis)} when the load job computed them (else computed here).
        """
        from workbench.model.inventory import layer_inventory
        from workbench.plan.plan import Plan

        layers = layer_inventory(loaded.model)
        self._outliers = outliers if outliers is not None else weight_outliers(loaded.model, layers)
        plan = Plan(default="bf16")
        self._history = History(Snapshot(plan.to_json(), (), "start"))
        self.session = ModelSession(loaded)
        with param.parameterized.batch_call_watchers(self):
            self.loaded, self.description, self.layers = loaded, loaded.description, layers
            self.inspection = None
            self.kv_stats = None
            self.details = None
            self.sensitivity = None
            self.evaluations, self.chat_log = [], []
            self.selected = layers[0].name
            self._install(plan, [])
            self.phase = "ready"
        self.notify(f"loaded {loaded.description.name}: {len(layers)} quantizable layers", "success")

    def load(self, source: str | None = None, wait: bool = False) -> Job:
        """Load a model in the background (progress in the job); `wait` blocks (tests, notebooks)."""
        from pathlib import Path

        restore = self.source if self.loaded is not None else "default"
        if source is not None:
            self.source = source
        self.phase = "loading"
        src = self.source
        return self._start(
            f"load {Path(src).name or src}",
            lambda report: tasks.load(src, report),
            lambda result: self.set_model(*result),
            wait,
            failed=lambda m: adopt.load_failed(self, src, restore, m),
        )

    # ------------------------------------------------------------------ plan: derived values
    def _install(self, plan, pinned: list[str]) -> None:
        """Make `plan` current (already validated) and recompute the derived values."""
        from workbench.plan.plan import plan_totals

        t0 = time.perf_counter()
        resolved = plan.resolve(self.layers)
        totals = plan_totals(resolved, self.layers)
        cost = self._price(resolved)
        table = self._layer_table(resolved, pinned, cost)
        with param.parameterized.batch_call_watchers(self):
            self.plan, self.pinned, self.resolved = plan, list(pinned), resolved
            self.totals, self.cost, self.table = totals, cost, table
            self.can_undo = bool(self._history and self._history.can_undo)
            self.can_redo = bool(self._history and self._history.can_redo)
            self.edit_seconds = time.perf_counter() - t0
            self.revision += 1

    def _price(self, resolved):
        if self.sensitivity is None:
            return None
        from workbench.plan.edit import predicted_cost

        return predicted_cost(self.sensitivity, resolved)

    def _layer_table(self, resolved, pinned: list[str], cost):
        return layer_table(self.layers, resolved, pinned, cost, self._outliers, self.inspection)

    def refresh(self) -> None:
        """Recompute the derived values of the current plan (after new sensitivity data)."""
        if self.plan is not None:
            self._install(self.plan, self.pinned)

    # ------------------------------------------------------------------ plan: edits
    def _commit(self, plan, pinned: list[str] | None = None, label: str = "edit") -> bool:
        """Validate and make `plan` current with an undo step; on a problem keep the plan and say why."""
        pinned = list(self.pinned if pinned is None else pinned)
        try:
            plan.validate(self.layers)
        except WorkbenchError as exc:
            self.notify(f"{exc} - the current plan is kept", "error")
            return False
        if not self._history.push(Snapshot(plan.to_json(), tuple(pinned), label)):
            return True
        self._install(plan, pinned)
        return True

    def _require_model(self) -> None:
        if self.plan is None or not self.layers:
            raise WorkbenchError("no model loaded yet")

    def _edit(self, fn, label: str) -> bool:
        """Run a planedit function; user mistakes become a notice and leave the plan unchanged."""
        self._require_model()
        try:
            plan = fn()
        except WorkbenchError as exc:
            self.notify(f"{exc} - the current plan is kept", "error")
            return False
        ok = self._commit(plan, label=label)
        if ok:
            self.notify(label, "info")
        return ok

    def set_layer_spec(self, name: str, spec: str) -> bool:
        """Assign `spec` to one layer."""
        from workbench.plan.edit import with_layer_spec

        return self._edit(lambda: with_layer_spec(self.plan, self.layers, name, spec), f"{name} -> {spec}")

    def set_rule(self, match: str, spec: str) -> bool:
        """Bulk edit: every layer selected by `match` (exact name, `re:`, `role:`) gets `spec`."""
        from workbench.plan.edit import with_rule

        return self._edit(lambda: with_rule(self.plan, self.layers, match, spec), f"{match} -> {spec}")

    def set_role_spec(self, role: str, spec: str) -> bool:
        return self.set_rule(f"role:{role}", spec)

    def set_regex_spec(self, pattern: str, spec: str) -> bool:
        return self.set_rule(f"re:{pattern}", spec)

    def set_default(self, spec: str) -> bool:
        from workbench.plan.edit import default_reach, with_default

        ok = self._edit(lambda: with_default(self.plan, spec), f"default -> {spec}")
        if ok and default_reach(self.plan, self.layers) < len(self.layers):
            n = default_reach(self.plan, self.layers)
            self.notify(
                f"default -> {spec}: reaches {n} of {len(self.layers)} layers; the plan's "
                f"{len(self.plan.rules)} rules (e.g. an allocation's) override the rest - remove them, or "
                f"use a regex rule '.*' to set every layer",
                "warning",
            )
        return ok

    def set_kv(self, k: str | None, v: str | None) -> bool:
        """Every attention block's key / value cache spec ('none': bf16), `workbench.plan.kv.with_kv`."""
        from workbench.plan.edit import with_kv

        return self._edit(lambda: with_kv(self.plan, k, v), f"KV cache -> K {k or 'none'} / V {v or 'none'}")

    def remove_rule(self, index: int) -> bool:
        from workbench.plan.edit import without_rule

        return self._edit(lambda: without_rule(self.plan, index), f"removed rule {index + 1}")

    def set_pinned(self, name: str, pinned: bool = True) -> bool:
        """Pin (or unpin) a layer: the allocator keeps its current spec."""
        self._require_model()
        if name not in {x.name for x in self.layers}:
            self.notify(f"layer '{name}' is not a quantizable layer of this model", "error")
            return False
        pins = [p for p in self.pinned if p != name] + ([name] if pinned else [])
        return self._commit(self.plan, pins, label=f"{'pin' if pinned else 'unpin'} {name}")

    def undo(self) -> bool:
        snap = self._history.undo() if self._history else None
        return self._restore(snap, "undo")

    def redo(self) -> bool:
        snap = self._history.redo() if self._history else None
        return self._restore(snap, "redo")

    def _restore(self, snap: Snapshot | None, verb: str) -> bool:
        from workbench.plan.plan import Plan

        if snap is None:
            self.notify(f"nothing to {verb}", "warning")
            return False
        self._install(Plan.from_json(snap.plan), list(snap.pinned))
        self.notify(f"{verb}: {snap.label}" if verb == "redo" else f"{verb}", "info")
        return True

    # ------------------------------------------------------------------ plan: files
    def plan_json(self) -> str:
        """The current plan as JSON text (with the pins recorded in meta)."""
        d = self.plan.to_json()
        if self.pinned:
            d.setdefault("meta", {})["pinned"] = list(self.pinned)
        return json.dumps(d, indent=2) + "\n"

    def load_plan_text(self, text: str | bytes, source: str = "plan file") -> bool:
        """Adopt a plan from JSON text; if it does not fit this model, explain and keep the current plan."""
        from workbench.plan.plan import Plan

        self._require_model()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            self.notify(
                f"{source}: invalid JSON at line {exc.lineno} ({exc.msg}) - the current plan is kept", "error"
            )
            return False
        try:
            plan = Plan.from_json(d, source=source)
        except WorkbenchError as exc:
            self.notify(f"{exc} - the current plan is kept", "error")
            return False
        pins = [p for p in plan.meta.get("pinned", []) if isinstance(p, str)]
        unknown = [p for p in pins if p not in {x.name for x in self.layers}]
        if unknown:
            self.notify(
                f"{source}: pinned layer {unknown[0]} is not in this model ({len(unknown)} unknown)"
                " - the current plan is kept",
                "error",
            )
            return False
        try:
            plan.validate(self.layers)
        except WorkbenchError as exc:
            self.notify(
                f"{source} does not fit {self.description.name}: {exc} - the current plan is kept", "error"
            )
            return False
        self._commit(plan, pins, label=f"loaded {source}")
        self.notify(f"loaded {source}: {len(plan.rules)} rules", "success")
        return True

    def export_llama_cpp(self):
        """The llama.cpp tensor-type override file of the current plan (`.text`, `.notes`)."""
        from workbench.export.llama_cpp import llama_cpp_export

        return llama_cpp_export(self.resolved, self.layers)

    # ------------------------------------------------------------------ allocation
    def allocate(self, budget_bits: float | None = None, budget_mb: float | None = None) -> bool:
        """Run the exact allocator on the sensitivity table under a budget, keeping pinned layers."""
        from workbench.plan.allocate import allocate_table

        self._require_model()
        if self.sensitivity is None:
            self.notify("compute the sensitivity table first (Sensitivity tab)", "warning")
            return False
        pins = {name: str(self.resolved[name]) for name in self.pinned}
        try:
            alloc = allocate_table(
                self.sensitivity, budget_bits=budget_bits, budget_mb=budget_mb, pinned=pins
            )
        except WorkbenchError as exc:
            self.notify(f"{exc} - the current plan is kept", "error")
            return False
        what = f"{budget_bits} bits/weight" if budget_bits is not None else f"{budget_mb} MB"
        ok = self._commit(alloc.plan, label=f"allocate {what}")
        if ok:
            self.notify(
                f"allocated for {what}: {alloc.avg_bits:.3f} bits/weight, {alloc.mb:.3f} MB, "
                f"predicted cost {alloc.predicted_cost:.4g}"
                + (f" - {alloc.note}" if alloc.note else "")
                + (f" - {alloc.evidence}" if alloc.evidence else ""),
                _allocate_kind(alloc),
            )
        return ok

    # ------------------------------------------------------------------ statistics
    def calibration_settings(self) -> dict:
        """Calibration text and size for this model: small enough to stay interactive on a CPU."""
        return defaults.calibration_settings(self.description)

    def compute_stats(self, wait: bool = False, **settings) -> Job:
        """Activation statistics in the background (cached on disk by the core)."""
        self._require_model()
        cfg = {**self.calibration_settings(), **settings}
        args = cfg["text"], cfg["n_seqs"], cfg["seq_len"]
        return self._start(
            "statistics",
            lambda report: tasks.statistics(self.session, *args, report),
            lambda inspection: adopt.inspection(self, inspection, *args),
            wait,
        )

    def compute_kv_stats(
        self, wait: bool = False, text: str = "wiki", n_seqs: int = 8, seq_len: int = 256
    ) -> Job:
        """K / V statistics of every attention block in the background (cached on disk by the core)."""
        self._require_model()
        return self._start(
            "K/V statistics",
            lambda report: tasks.kv_stats(self.session, text, n_seqs, seq_len, report),
            lambda stats: setattr(self, "kv_stats", stats),
            wait,
        )

    def effective_grid_spec(self) -> str | None:
        """The grid to overlay: the chosen one, else the layer's current spec, else int4_g128."""
        if self.grid_spec:
            return self.grid_spec
        spec = self.resolved.get(self.selected)
        return str(spec) if spec is not None and spec.is_quantized else "int4_g128"

    def request_details(self, wait: bool = False) -> Job | None:
        """Compute the selected layer's report (weights, grid, activations, per-spec errors) in a job."""
        if not self.selected or self.loaded is None:
            return None
        specs = [s for s in CANDIDATE_SPECS if s != "bf16"]
        for old in self.running_jobs():
            if old.name.startswith("layer "):
                old.cancel()  # only the latest selection matters
        args = self.loaded, self.selected, self.effective_grid_spec(), specs, self.inspection
        return self._start(
            f"layer {self.selected.removeprefix('model.')}",
            lambda report: tasks.layer_details(*args, report),
            lambda report: setattr(self, "details", report),
            wait,
            failure="layer statistics failed",
        )

    # ------------------------------------------------------------------ sensitivity, evaluation, chat
    def compute_sensitivity(
        self, specs: list[str] | None = None, wait: bool = False, method: str = defaults.DEFAULT_METHOD, **kw
    ) -> Job:
        """Sensitivity table of every layer x spec in the background (cached and resumable).

        The default method and settings are `workbench.defaults`' (Fisher-weighted proxy); the statistics'
        Gram matrices are reused when they were collected on the same calibration tokens.
        """
        self._require_model()
        cfg = {**defaults.scan_settings(self.description), **kw}
        specs = [str(QuantSpec.parse(s)) for s in (specs or SENSITIVITY_SPECS)]
        grams = tasks.inspection_grams(self.inspection, cfg)
        return self._start(
            "sensitivity",
            lambda report: tasks.sensitivity(self.session, specs, method, cfg, grams, report),
            lambda table: adopt.sensitivity(self, table),
            wait,
        )

    def eval_settings(self) -> dict:
        """Evaluation text and size for this model (small enough to stay interactive on a CPU)."""
        return defaults.eval_settings(self.description)

    def evaluate(self, reference: bool = False, wait: bool = False, **settings) -> Job:
        """KL / perplexity / top-1 of the current plan (or the reference) in the background."""
        self._require_model()
        cfg = {**self.eval_settings(), **settings}
        ev = {k: cfg[k] for k in ("text", "seq_len", "max_tokens")}
        resolved = None if reference else self.resolved  # a ResolvedPlan, replaced (never mutated) on edits
        label = "reference" if reference else self.plan_label()
        calib, row = self.calibration_settings(), (label, self.plan_json(), self.totals, reference)
        return self._start(
            f"evaluate {label}",
            lambda report: tasks.evaluation(self.session, resolved, ev, calib, report),
            lambda result: adopt.evaluation(self, result, *row),
            wait,
            failure=f"evaluation of {label} failed",
            suffix=" (the plan is unchanged)",
        )

    def verify(self, wait: bool = False, **settings) -> Job | None:
        """Measure the current plan and the uniform plans next to it in size (quick evaluation, cached);
        `settings` override the evaluation's text / seq_len / max_tokens."""
        self._require_model()
        if self.sensitivity is None:
            self.notify("compute the sensitivity table first: verify compares its prediction", "warning")
            return None
        ev = {**self.eval_settings(), **settings}
        table, resolved, label = self.sensitivity, dict(self.resolved), self.plan_label()
        return self._start(
            f"verify {label}",
            lambda report: tasks.verification(self.session, table, resolved, ev, report),
            lambda v: adopt.verification(self, v, label),
            wait,
            failure="verification failed",
        )

    def plan_label(self) -> str:
        """A short name for the current plan in result tables."""
        t = self.totals
        rules = len(self.plan.rules)
        return f"#{self.revision} {t.avg_bits:.2f} b/w ({rules} rules, default {self.plan.default})"

    def chat(self, prompt: str, max_new_tokens: int = 48, wait: bool = False) -> Job:
        """Generate from `prompt` with the reference and the quantized model side by side."""
        self._require_model()
        if not prompt.strip():
            self.notify("type a prompt first", "warning")
            return None
        resolved, key = self.resolved, json.dumps(self.plan.to_json(), sort_keys=True)
        return self._start(
            "chat",
            lambda report: tasks.chat(self.session, prompt, max_new_tokens, resolved, key, report),
            lambda entry: setattr(self, "chat_log", self.chat_log + [entry]),
            wait,
        )

    # ------------------------------------------------------------------ jobs
    def _start(self, name: str, work, take, wait: bool, failed=None, failure: str = "", suffix: str = ""):
        """Run `work(report)` (a tasks.py function) in a Job; `take(result)` adopts it on the UI thread.

        On an error, `failed(message)` runs on the UI thread, or a notice "`failure`: message`suffix`"
        (default failure: "<name> failed"). `wait` blocks until the job ends (tests, notebooks).
        """
        failed = failed or (lambda m: self.notify(f"{failure or name + ' failed'}: {m}{suffix}", "error"))
        job = Job(
            name,
            lambda ctx: work(ctx.report),
            on_done=lambda result: self.run_ui(lambda: take(result)),
            on_error=lambda m: self.run_ui(lambda: failed(m)),
        )
        self.add_job(job)
        if wait:
            job.join()
        return job

    def add_job(self, job: Job) -> Job:
        """Start `job` and list it (the last 20 finished jobs are kept for the jobs panel)."""
        self.jobs = self.jobs[-20:] + [job]
        job.param.watch(lambda e: self._job_ended(job, e.new), "state")
        return job.start()

    def _job_ended(self, job: Job, outcome: str) -> None:
        """Redraw the jobs panel (finished jobs collapse to the last one); a cancel gets its own notice."""
        if outcome == "running":
            return

        def ui():
            self.param.trigger("jobs")
            if outcome == "cancelled":
                self.notify(f"{job.name}: cancelled", "warning")

        self.run_ui(ui)

    def running_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.running]

    def cancel_jobs(self) -> int:
        """Cancel every running job of this session (tab closed); returns how many."""
        running = self.running_jobs()
        for job in running:
            try:
                job.cancel()
            except Exception:  # a closed session's widgets may fail to update; the job is stopped anyway
                pass
        return len(running)


def _allocate_kind(alloc) -> str:
    """Notice level of an allocation: "success" as allocated; where the guard returned a measured plan,
    "info" when that plan measured below the best uniform plan that fits, else "warning"."""
    if not alloc.note:
        return "success"
    return "info" if alloc.wins else "warning"
