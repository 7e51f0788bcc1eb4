"""The Python API: the README's example runs exactly as written, results are the CLI's JSON,
and the library never prints (events go to the callback)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from qtool import api
from tests.conftest import REPO


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its API example (marked <!-- api-example -->)"
    return m.group(1)


@pytest.mark.slow  # 170 s: GPTQ of all 210 SmolLM2 linears on Q4_K/Q6_K blocks
def test_readme_api_example_runs_as_written(assets, tmp_path: Path, monkeypatch) -> None:
    """The snippet uses the default asset location (`make assets`)."""
    default = Path.home() / ".cache" / "qtool" / "assets"
    assert assets.root.resolve() == default.resolve(), "the README example assumes the default"
    monkeypatch.chdir(tmp_path)
    code = _readme_example()
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented snippet
    result = scope["result"]
    out = result.outputs[0]
    assert Path(out["path"]).exists() and out["methods"]["gptq"] == 210
    assert out["types"]["Q4_K"] >= 1


def test_inspect_result_is_the_cli_json(cli, tiny_llama: Path) -> None:
    data = api.inspect(str(tiny_llama)).data
    r = cli("inspect", tiny_llama, "--json")
    assert json.loads(r.stdout) == json.loads(json.dumps(data))


def test_library_never_prints_and_reports_through_events(
    assets, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    events: list[dict] = []
    res = api.quantize(
        str(assets.smollm2_hf), type="Q8_0", output=tmp_path / "m.gguf", on_event=events.append
    )
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert res.outputs[0]["bytes"] == (tmp_path / "m.gguf").stat().st_size
    kinds = {e["event"] for e in events}
    assert "advance" in kinds  # the writer's progress, in bytes
    done = [e for e in events if e["event"] == "advance"][-1]
    assert done["completed"] == done["total"]


def test_dry_run_reads_neither_weights_nor_data(tiny_llama: Path, monkeypatch) -> None:
    """--dry-run plans every method from headers: tensor reads and dataset loading fail here."""
    from qtool import checkpoint
    from qtool.calibrate import datasets

    def boom(*a, **k):
        raise AssertionError("read data in a dry run")

    monkeypatch.setattr(checkpoint.Checkpoint, "read_rows", boom)
    monkeypatch.setattr(datasets, "load_documents", boom)
    for opts in (
        dict(method="gptq", bits=4, group_size=64, dataset="canterbury"),
        dict(method="gptq", type="Q4_K_M", dataset="canterbury"),
        dict(method="rtn", bits=8, group_size=-1, act_bits=8, smoothquant=0.5,
             dataset="canterbury"),
        dict(method="bitnet"),
        dict(method="rtn", type="Q3_K_M"),
    ):  # fmt: skip
        res = api.quantize(str(tiny_llama), output="unused", dry_run=True, **opts)
        plan = res.outputs[0]
        assert plan["tensors"] and all("bytes" in t and "method" in t for t in plan["tensors"])
        methods = {t["method"] for t in plan["tensors"]} - {None}
        assert methods, opts
    assert not os.path.exists("unused")
