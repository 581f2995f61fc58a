from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from search.space import Architecture
from service.cli import app

runner = CliRunner()
FAST = ["--repeats", "1"]
CBAM_PARAMS = 272_995  # CIFAR ResNet-20 (10 classes) with the paper's CBAM in every block
BASELINE_PARAMS = 269_722


def _flat(text: str) -> str:
    """Output without rich's box drawing and line wrapping."""
    return " ".join(text.replace("│", " ").split())


def _inspect(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["inspect", *args])
    return result.exit_code, result.stdout, _flat(result.output)


def test_inspect_json() -> None:
    code, stdout, _ = _inspect("--backbone", "cifar_resnet20", "--preset", "paper", "--json", *FAST)
    assert code == 0
    report = json.loads(stdout)
    assert report["params"] == CBAM_PARAMS
    assert report["baseline_params"] == BASELINE_PARAMS
    assert report["label"] == "CBAM c->s r16 avg+max k7 @all"
    assert report["num_classes"] == 10
    assert report["input_shape"] == [3, 32, 32]
    assert report["latency_ms"] > 0
    assert report["attention_ops"] > 0
    assert report["train_step_ms"] is None


def test_inspect_table() -> None:
    code, _, output = _inspect(
        "--backbone", "cifar_resnet20", "--preset", "se", "--train-step", *FAST
    )
    assert code == 0
    for text in ("SE r16 @all", "Parameters", "MACs", "Latency", "Train step", "Peak train memory"):
        assert text in output


def test_inspect_architecture_file(tmp_path: Path) -> None:
    arch = Architecture("cifar_resnet20", arrangement="channel", stages=(3,), blocks="last")
    path = tmp_path / "arch.json"
    path.write_text(arch.to_json())
    code, stdout, _ = _inspect("--architecture", str(path), "--json", "--no-latency")
    assert code == 0
    report = json.loads(stdout)
    assert report["architecture_id"] == arch.id
    assert report["latency_ms"] is None
    assert report["params"] == BASELINE_PARAMS + 2 * 64 * 4 + 4 + 64


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--backbone", "resnet18", "--preset", "paperish"], ["'paper'", "'se'", "'none'"]),
        (["--backbone", "vgg16"], ["backbone: 'vgg16'", "'resnet18'", "'cifar_resnet20'"]),
        (["--preset", "paper"], ["--backbone"]),
        (["--backbone", "cifar_resnet20", "--device", "quantum"], ["device", "'cpu'"]),
        (["--backbone", "cifar_resnet20", "--num-classes", "0"], ["--num-classes"]),
    ],
)
def test_inspect_bad_input_exits_2(args: list[str], expected: list[str]) -> None:
    code, stdout, output = _inspect(*args, "--json")
    assert code == 2
    assert stdout == ""
    for text in expected:
        assert text in output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"backbone": "cifar_resnet20", "kernel_size": 4}', ["kernel_size: 4", "1, 3, 5, 7, 9"]),
        ('{"backbone": "cifar_resnet20", "stages": [4]}', ["stages", "1, 2, 3"]),
        ('{"backbone": "cifar_resnet20", "colour": "red"}', ["'colour'", "kernel_size"]),
        ("{not json", ["architecture", "JSON object"]),
    ],
)
def test_inspect_bad_architecture_file_exits_2(
    tmp_path: Path, content: str, expected: list[str]
) -> None:
    path = tmp_path / "arch.json"
    path.write_text(content)
    code, _, output = _inspect("--architecture", str(path), "--json")
    assert code == 2
    for text in expected:
        assert text in output


def test_inspect_preset_and_architecture_are_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "arch.json"
    path.write_text(Architecture("cifar_resnet20").to_json())
    code, _, output = _inspect("--architecture", str(path), "--preset", "se")
    assert code == 2
    assert "--architecture" in output
    code, _, _ = _inspect("--architecture", str(tmp_path / "missing.json"))
    assert code == 2


@pytest.mark.e2e
def test_console_script() -> None:
    script = Path(sys.executable).parent / "cbam-nas"
    if not script.exists():
        pytest.skip("the cbam-nas console script is not installed")
    args = ["inspect", "--backbone", "cifar_resnet20", "--preset", "paper", "--json", *FAST]
    done = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["params"] == CBAM_PARAMS
    bad = subprocess.run(
        [str(script), "inspect", "--backbone", "cifar_resnet20", "--preset", "bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
