"""benchmarks/gpu.py --tiny: the GPU suite's code path on CPU, every section giving its figures."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_runs_tiny(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())["results"]
    assert sorted(results) == ["chat", "interleave", "lm_mfu", "lora_sft", "stage1"]
    for name, value in results.items():
        for row in value if isinstance(value, list) else [value]:
            assert "error" not in row, (name, row)
    assert results["lm_mfu"]["tokens_per_s"] > 0 and results["interleave"]["speech_tokens_per_s"] > 0
    assert 0 < results["lora_sft"][0]["trainable"] < results["lora_sft"][0]["params"]
    assert results["chat"]["first_audio_ms"] == sum(results["chat"][k] for k in ("tokenizer_ms", "lm_first_block_ms",
                                                                                  "vocoder_ms"))
    assert "| lm_mfu |" in (tmp_path / "gpu.md").read_text()
