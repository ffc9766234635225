"""The plan view's deployment buttons on stories260K: the downloads are a GGUF file that gguf reads with the
plan's types, and a zip of a compressed-tensors folder whose config holds the plan's groups."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

pytest.importorskip("panel")

from workbench.ui.state import WorkbenchState  # noqa: E402
from workbench.ui.views.plan_view import PlanView  # noqa: E402


@pytest.fixture()
def view(stories):
    s = WorkbenchState()
    s.set_model(stories)
    s.set_default("int4_g32")
    return PlanView(state=s)


def test_gguf_button(view, tmp_path):
    import gguf

    data = view._deploy_button("gguf", "export GGUF").callback()
    (tmp_path / "plan.gguf").write_bytes(data.getvalue())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "plan.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.0.ffn_down.weight"] == "BF16"


def test_compressed_tensors_button(view):
    pytest.importorskip("compressed_tensors")
    data = view._deploy_button("compressed-tensors", "export compressed-tensors").callback()
    with zipfile.ZipFile(io.BytesIO(data.getvalue())) as z:
        names = z.namelist()
        cfg = json.loads(z.read("stories260K-ct/config.json"))["quantization_config"]
    assert "stories260K-ct/model.safetensors" in names
    (group,) = cfg["config_groups"].values()  # one spec: int4_g32 (down_proj's 172 columns are kept)
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert "model.layers.0.mlp.down_proj" in cfg["ignore"]
