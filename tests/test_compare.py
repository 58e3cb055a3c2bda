"""`python -m mnist_flax compare`: the table, --json, --sort, bad input, and the HTML report in a real browser."""

import base64
import html
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, run_sweep

from mnist_flax import layout
from mnist_flax.commands import compare
from mnist_flax.tracking import wandb_run

# A sweep of three runs and a headless browser: in make test, not in make test-fast.
pytestmark = pytest.mark.slow

# Plain SGD at a constant rate: 0.01 and 0.1 train (to different accuracies), 1e12 diverges at once and fails.
RATES = ("0.01", "0.1", "1e12")
MEMBERS = ("000-0.01", "001-0.1", "002-1e12")
SETTINGS = {"checkpoint.enabled": False, "optimizer.name": "sgd", "optimizer.schedule": "constant"}
WITHOUT_TOKEN = {k: v for k, v in os.environ.items() if k not in wandb_run.TOKEN_VARIABLES}


@pytest.fixture(scope="module")
def sweep_root(tiny_data_dir, tmp_path_factory) -> str:
    """A sweep of three tiny MLP runs made by the local sweep runner; the last one fails (non-finite loss)."""
    root = str(tmp_path_factory.mktemp("compare") / "lr")
    result = run_sweep(root, "configs/mlp.py", f"optimizer.learning_rate={','.join(RATES)}", tiny_data_dir, **SETTINGS)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # 1: a member failed
    assert sorted(os.listdir(root)) == [*MEMBERS, layout.STUDY_DB, layout.SUMMARY, layout.SWEEP]
    return root


def run_compare(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_flax", "compare", *args],
        cwd=REPO_ROOT,
        env=env or os.environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _final(root: str, member: str) -> dict:
    with open(os.path.join(root, member, layout.FINAL_METRICS)) as f:
        return json.load(f)


# ---------------------------------------------------------------- the table and --json


def test_the_table_names_each_run_its_differing_fields_and_a_failed_member(sweep_root):
    result = run_compare(sweep_root)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "status", "optimizer.learning_rate"]  # the one field that differs
    assert "batch_size" not in lines[0] and "wandb.name" not in lines[0]  # same everywhere / differs by design
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert list(rows) == list(MEMBERS)
    for member, rate in zip(MEMBERS[:2], ("0.01", "0.1"), strict=True):
        final = _final(sweep_root, member)
        cells = rows[member]
        assert cells[1:3] == ["finished", rate]
        assert cells[3:5] == [f"{final['best_validation']['val_accuracy']:.4f}", str(final["best_validation"]["step"])]
        assert cells[5:8] == [f"{final['test'][k]:.4f}" for k in ("accuracy", "f1_macro", "auroc_macro")]
        assert (
            cells[9] == str(final["steps"])
            and cells[10] == final["git"]["commit"][:7] + "-dirty" * final["git"]["dirty"]
        )
    assert rows["002-1e12"][1:3] == ["failed", "1e+12"] and rows["002-1e12"][3:9] == ["-"] * 6
    (note,) = [line for line in lines if line.startswith("002-1e12: failed: ")]
    assert "non-finite" in note  # the run's own reason, from stopped.json


def test_json_parses_and_holds_what_each_run_wrote(sweep_root):
    result = run_compare(sweep_root, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fields"] == ["optimizer.learning_rate"] and report["errors"] == []
    rows = report["runs"]
    assert [r["run"] for r in rows] == list(MEMBERS)
    assert [r["status"] for r in rows] == ["finished", "finished", "failed"]
    assert [r["config"] for r in rows] == [{"optimizer.learning_rate": float(rate)} for rate in RATES]
    for row in rows[:2]:
        final = _final(sweep_root, row["run"])
        assert row["path"] == os.path.join(sweep_root, row["run"]) and row["reason"] is None
        assert row["test_accuracy"] == final["test"]["accuracy"] and row["f1_macro"] == final["test"]["f1_macro"]
        assert row["best_val_accuracy"] == final["best_validation"]["val_accuracy"]
        assert row["seconds"] == final["seconds"] and row["steps"] == final["steps"]
    assert rows[0]["test_accuracy"] != rows[1]["test_accuracy"]
    with open(os.path.join(sweep_root, "002-1e12", layout.STOPPED)) as f:
        stopped = json.load(f)
    assert rows[2]["reason"] == stopped["reason"] and rows[2]["steps"] == stopped["step"]
    assert rows[2]["test_accuracy"] is None and rows[2]["seconds"] is None


def test_sort_orders_best_first_and_keeps_blanks_last(sweep_root, capsys):
    def order(*args: str) -> list[str]:
        assert compare.main([sweep_root, "--json", *args]) == 0
        return [row["run"] for row in json.loads(capsys.readouterr().out)["runs"]]

    best_first = sorted(MEMBERS[:2], key=lambda m: -_final(sweep_root, m)["test"]["accuracy"])
    assert order("--sort", "test_accuracy") == [*best_first, "002-1e12"]
    assert order("--sort", "test_accuracy", "--reverse") == [*best_first[::-1], "002-1e12"]
    assert order("--sort", "optimizer.learning_rate", "--reverse") == list(MEMBERS[::-1])
    assert compare.main([sweep_root, "--sort", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sort nonsense: not a column") and err.count("\n") == 1


def test_runs_that_share_a_name_are_told_apart(sweep_root, tmp_path, capsys):
    other = str(tmp_path / "again")
    shutil.copytree(sweep_root, other)
    offline = next((tmp_path / "again" / "000-0.01" / "wandb").glob("offline-run-*"))
    assert compare.main([sweep_root, other, str(offline), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [row["run"] for row in report["runs"]]
    assert names[:2] == ["lr/000-0.01 (workdir)", "lr/001-0.1 (workdir)"] and names[3] == "again/000-0.01 (workdir)"
    assert names[-1] == "000-0.01 (W&B offline)" and len(set(names)) == len(names) == 7
    assert report["fields"] == ["optimizer.learning_rate"]  # the W&B group (the sweep's name) is the runner's
    assert report["runs"][-1]["test_accuracy"] == report["runs"][0]["test_accuracy"]  # one run, two sources


# ---------------------------------------------------------------- bad input


def test_a_folder_that_is_no_run_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    result = run_compare(str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert f"{tmp_path} is not a run workdir" in result.stderr


def test_each_bad_reference_is_one_line_and_the_good_runs_are_still_compared(sweep_root, tmp_path):
    half = tmp_path / "half-written"
    shutil.copytree(os.path.join(sweep_root, "000-0.01"), half)
    text = (half / layout.FINAL_METRICS).read_text()
    (half / layout.FINAL_METRICS).write_text(text[: len(text) // 2])  # killed while writing it
    garbled = tmp_path / "garbled"
    shutil.copytree(os.path.join(sweep_root, "001-0.1"), garbled)
    lines = (garbled / layout.METRICS).read_text().splitlines()
    (garbled / layout.METRICS).write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    bad = [str(tmp_path / "missing"), str(half), str(garbled), "my-team/mnist/abc12345"]

    result = run_compare(sweep_root, *bad, env=WITHOUT_TOKEN)
    assert result.returncode == 2
    errors = result.stderr.splitlines()
    assert len(errors) == len(bad) + 1 and all(line.startswith("error: ") for line in errors[:-1]), errors
    for line, reference, says in zip(
        errors[:-1], bad, ["no such run folder", "cannot read", "not a JSON object", "needs a W&B key"], strict=True
    ):
        assert reference in line and says in line, line
    assert errors[-1] == "compared 3 runs; left out the 4 above"
    assert [line.split()[0] for line in result.stdout.splitlines()[2:5]] == list(MEMBERS)  # the good ones

    only_bad = run_compare(*bad[:2])
    assert only_bad.returncode == 2 and only_bad.stdout == "" and len(only_bad.stderr.splitlines()) == 2


def test_a_member_that_never_trained_is_a_row_not_dropped(sweep_root, tmp_path, capsys):
    root = tmp_path / "partial"
    shutil.copytree(sweep_root, root)
    member = root / "001-0.1"
    log, trial = (member / layout.SWEEP_LOG).read_text(), (member / layout.TRIAL).read_text()
    shutil.rmtree(member)
    member.mkdir()  # it failed before writing its config: only the worker's records of it are there
    (member / layout.TRIAL).write_text(trial)
    (member / layout.SWEEP_LOG).write_text(log.split("\n")[0] + "\nerror: data folder /nowhere is missing\n")
    never = root / "002-1e12"  # a worker took this trial and died before its main.py started
    trial = (never / layout.TRIAL).read_text()
    shutil.rmtree(never)
    never.mkdir()
    (never / layout.TRIAL).write_text(trial)
    assert compare.main([str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["run"], r["status"]) for r in rows] == [
        ("000-0.01", "finished"),
        ("001-0.1", "failed"),
        ("002-1e12", "incomplete"),
    ]
    assert rows[1]["reason"] == "before training: error: data folder /nowhere is missing"
    assert rows[2]["reason"] == "not started" and rows[2]["config"] == {}  # nothing known, nothing differs


# ---------------------------------------------------------------- the HTML report


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_html_report_is_one_self_contained_page(sweep_root, tmp_path):
    odd = tmp_path / 'a<b>&"c'  # a run name that must be escaped
    shutil.copytree(os.path.join(sweep_root, "000-0.01"), odd)
    page_path = tmp_path / "report.html"
    assert compare.main([sweep_root, str(odd), "--html", str(page_path)]) == 0
    page = page_path.read_text()
    links = re.findall(r'\s(?:src|href)="([^"]*)"', page)
    assert len(links) == 4 and all(link.startswith("data:image/png;base64,") for link in links)  # curves, 3 matrices
    assert not re.search(r"https?://|<script|<link|@import|url\(", page)
    for link in links:
        width, height = _png_size(base64.b64decode(link.removeprefix("data:image/png;base64,")))
        assert width > 200 and height > 200
    assert "a&lt;b&gt;&amp;&quot;c" in page and 'a<b>&"c' not in page
    for member in MEMBERS:
        assert page.count(member) >= 2  # the table and the config difference
    assert "non-finite" in page and "optimizer.learning_rate" in page

    epochs = tmp_path / "epochs.html"
    assert compare.main([os.path.join(sweep_root, "001-0.1"), "--html", str(epochs), "--x-axis", "epoch"]) == 0
    assert "Learning curves (by epoch)" in epochs.read_text()


# A test-only copy of the page gets this script: it writes each image's natural size and where it is drawn, and
# every request the page's Content-Security-Policy blocked, into the DOM for --dump-dom to show.
PROBE = """<script>
var blocked = [];
document.addEventListener('securitypolicyviolation', function (e) { blocked.push(e.blockedURI); });
window.addEventListener('load', function () {
  var images = Array.from(document.images).map(function (img) {
    var box = img.getBoundingClientRect();
    return {alt: img.alt, natural: [img.naturalWidth, img.naturalHeight], complete: img.complete,
            box: [box.left + window.scrollX, box.top + window.scrollY, box.width, box.height]};
  });
  var out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({images: images, blocked: blocked});
  document.body.appendChild(out);
});
</script>"""


def _no_network() -> list[str]:
    """A prefix that runs a command in a network namespace of its own (loopback only), where the system allows."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return []


def _chromium(tmp_path, *args: str) -> str:
    """Runs headless Chromium without a network; returns its stdout. Stopped by its process id on a timeout."""
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    command = [*_no_network(), shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu"]
    command += ["--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars", "--proxy-server=127.0.0.1:9"]
    command += [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=120)
    finally:
        try:  # it and any helper it left: its own process group, whose id is its process id
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, err[-3000:]
    return out


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)]) / 255


def _pixels_near(pixels: np.ndarray, colour: str) -> int:
    return int((np.abs(pixels - _rgb(colour)).max(axis=2) < 0.06).sum())


def test_the_html_report_renders_in_headless_chromium_without_a_network(sweep_root, tmp_path):
    assert shutil.which("chromium"), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    from matplotlib import image

    page = tmp_path / "report.html"
    assert compare.main([sweep_root, "--html", str(page)]) == 0
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert "<title>Comparison of 3 runs</title>" in dom
    for member in MEMBERS:
        assert f"</span>{member}</td>" in dom  # a row of the rendered table
    probe = tmp_path / "probe.html"
    text = page.read_text().replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probe.write_text(text.replace("</head>", PROBE + "</head>", 1))
    dumped = re.search(r'<pre id="probe">(.*?)</pre>', _chromium(tmp_path, "--dump-dom", probe.as_uri()))
    found = json.loads(html.unescape(dumped[1]))
    assert found["blocked"] == []  # the page asked for nothing outside itself
    images = {img["alt"]: img for img in found["images"]}
    assert list(images) == ["learning curves", "confusion matrix of 000-0.01", "confusion matrix of 001-0.1"]

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    pixels = image.imread(str(shot))[..., :3]  # floats in [0, 1]
    assert pixels.shape == (2000, 1200, 3)
    colours = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    dark = (pixels.min(axis=2) < 0.9).mean()
    boxes = {alt: [round(v) for v in img["box"]] for alt, img in images.items()}
    print(f"screenshot {pixels.shape}: std {pixels.std():.3f}, {dark:.1%} non-white, {colours} colours; {boxes}")
    assert pixels.std() > 0.05 and dark > 0.02 and colours > 100  # not blank
    for alt, img in images.items():
        left, top, width, height = (round(v) for v in img["box"])
        assert img["complete"] and min(img["natural"]) > 200 and min(width, height) > 200, img
        assert top + height <= 2000, f"{alt} is below the screenshot"
        drawn = pixels[top : top + height, left : left + width]
        assert drawn.std() > 0.1, alt  # an image with something in it, on the screen
        if alt == "learning curves":  # both finished runs' curves, in their table colours
            assert all(_pixels_near(drawn, colour) > 100 for colour in compare._colours(2)), alt
        else:  # the darkest blue of the matrix's diagonal
            assert _pixels_near(drawn, "#08306b") > 100, alt
