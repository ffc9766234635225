"""A plan export as one downloadable file (for the app's buttons): a GGUF file, or a compressed-tensors
folder zipped. The exports themselves: `export_gguf.gguf_export`, `export_ct.compressed_tensors_export`."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

from workbench.quant.spec import QuantSpec

DOWNLOADS = {"gguf": "plan.gguf", "compressed-tensors": "plan-compressed-tensors.zip"}


def export_download(loaded, resolved: dict[str, QuantSpec], fmt: str) -> tuple[bytes, list[str]]:
    """(file bytes, notes) of `fmt` ("gguf" or "compressed-tensors") for `loaded` quantized by `resolved`.

    Raises:
        WorkbenchError: as the export (e.g. a gptq layer, which needs calibration: use the CLI).
    """
    assert fmt in DOWNLOADS, f"unknown export format {fmt}"
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "gguf":
            from workbench.export.gguf import gguf_export

            ex = gguf_export(loaded, resolved, Path(tmp) / DOWNLOADS[fmt])
            return ex.path.read_bytes(), ex.mismatches + ex.notes
        from workbench.export.compressed_tensors import compressed_tensors_export

        ex = compressed_tensors_export(loaded, resolved, Path(tmp) / "model")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(ex.folder.iterdir()):
                z.write(f, f"{loaded.description.name}-ct/{f.name}")
        return buf.getvalue(), ex.notes
