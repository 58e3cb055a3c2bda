"""The README and the manual tell the truth: every config field is in docs/config.md with its default, the quick
start names the two make targets, the README's results are quoted from benchmarks/RESULTS.md, every link
resolves, and every command they name exists."""

import glob
import os
import re
import shutil
import subprocess

from conftest import REPO_ROOT

from mnist_flax.commands import COMMANDS
from mnist_flax.config import schema


def _read(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path)) as f:
        return f.read()


README = _read("README.md")
PAGES = ["README.md", "launch/README.md", "benchmarks/README.md"] + sorted(
    os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "**", "*.md"), recursive=True)
)


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


# ---------------------------------------------------------------- the config reference


def _table_rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| (`[^|]+`) \| ([^|]*) \|", line)
        if match:
            for name in re.findall(r"`([a-z0-9_.]+)`", match.group(1)):
                rows[name] = match.group(2).strip()
    return rows


def test_every_config_field_is_documented_with_its_default():
    rows = _table_rows(_read("docs/config.md"))
    defaults = schema.flatten(schema.load_config_file(os.path.join(REPO_ROOT, "configs", "default.py")))
    missing = sorted(set(defaults) - set(rows))
    assert not missing, f"fields missing from docs/config.md: {missing}"
    for name, value in defaults.items():
        assert _normalise(value) in _normalise(rows[name]), (
            f"{name}: docs/config.md says {rows[name]!r}, config {value!r}"
        )


def _normalise(value) -> str:
    """Both sides as comparable text: (32, 64) and [32, 64] alike, '' for empty strings, no quotes or spaces."""
    text = value if isinstance(value, str) else repr(value)
    if value == "":
        text = "''"
    for old, new in (("`", ""), ("(", "["), (")", "]"), (",]", "]"), (" ", ""), ('"', "")):
        text = text.replace(old, new)
    return text if text == "''" else text.replace("'", "")


# ---------------------------------------------------------------- the README


def test_quick_start_names_the_two_commands():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make train" in quick_start and "make test" in quick_start
    makefile = _read("Makefile")
    assert re.search(r"^train: setup", makefile, re.M) and re.search(r"^test: setup", makefile, re.M)


def _quick_start_commands() -> list[str]:
    """The commands of the Quick start's first code block, comments dropped."""
    block = re.search(r"```bash\n(.*?)```", _section(README, "Quick start"), re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_quick_start_commands_work_copied_in_order():
    # Each command uses only workdirs and exports an earlier command made: `make train` writes runs/NAME-TIMESTAMP
    # unless told a WORKDIR, so `export runs/cnn` after a bare `make train` would find nothing.
    made = set()
    for command in _quick_start_commands():
        words = command.split()
        for word in words:
            named = re.match(r"(?:WORKDIR=|--workdir=)(runs/[\w.-]+)$", word)
            if named:
                made.add(named.group(1))
        if words[:3] == ["python", "-m", "mnist_flax"] and words[3] in ("compare", "export", "predict"):
            used = [w for w in words[4:] if w.startswith("runs/")]
            assert used, command
            for path in used:
                assert path in made, f"{command!r} uses {path}, which no earlier command of the Quick start made"
            if words[3] == "export":
                made.add(f"{used[0]}/export")
    assert any(c.split()[3:4] == ["predict"] for c in _quick_start_commands() if c.startswith("python -m"))


def test_the_readme_is_a_first_page():
    quick_start = _section(README, "Quick start")
    assert len(README.splitlines()) < 250
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README), "dated notes belong in benchmarks/RESULTS.md"
    # The light path beside the full one, with what the full one costs; --invert where predict is shown.
    assert "make test-fast" in quick_start and "25 minutes" in quick_start and "--invert" in quick_start
    assert "## Make it yours" in README


def test_the_readme_layout_lists_every_module():
    block = re.search(r"```\n(main\.py.*?)```", _section(README, "Layout"), re.S).group(1)
    listed, package = {}, None
    for line in block.splitlines():
        top = re.match(r"  ([a-z_]+)/ ", line)
        if top:
            package = top.group(1)
        elif not line.startswith("      "):
            package = None
        if package:
            listed[package] = listed.get(package, "") + line
    root = os.path.join(REPO_ROOT, "mnist_flax")
    missing = [
        f"{package}/{name}"
        for package in sorted(os.listdir(root))
        if os.path.isdir(os.path.join(root, package)) and not package.startswith("__")
        for name in sorted(os.listdir(os.path.join(root, package)))
        if name.endswith(".py") and name != "__init__.py" and name not in listed.get(package, "")
    ]
    assert not missing, f"modules the README's layout does not list: {missing}"


def _make_targets(makefile: str) -> dict[str, tuple[list[str], str]]:
    """target -> (its prerequisites, its recipe), for each rule of the Makefile."""
    targets = {}
    for match in re.finditer(r"^([a-z-]+):(?!=)(.*)\n((?:\t.*\n?)*)", makefile, re.M):
        prerequisites = match.group(2).split("##", 1)[0].split()
        targets[match.group(1)] = (prerequisites, match.group(3))
    return targets


def test_every_make_target_that_runs_the_venv_sets_it_up_first():
    # On a fresh clone .venv does not exist yet: a target calling $(PY) without `setup` fails there.
    targets = _make_targets(_read("Makefile"))
    assert {"train", "test", "test-fast", "lint", "format", "notebooks"} <= set(targets)
    for name, (prerequisites, recipe) in targets.items():
        if "$(PY)" in recipe:
            assert "setup" in prerequisites, f"make {name} runs .venv's python without the setup prerequisite"


def test_make_train_does_not_need_apt_get(tmp_path):
    # Outside Debian (no apt-get) and without the data set, setup-data says the way round in one line and goes on.
    result = subprocess.run(
        ["make", "-s", "setup-data", f"DATA_DIR={tmp_path}/none"],
        cwd=REPO_ROOT,
        env={"PATH": str(tmp_path)},  # no apt-get (nor anything else) on the PATH
        executable=shutil.which("make"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "--config.data.local_dir=DIR" in lines[0] and "TFDS" in lines[0], result.stdout


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]


def test_the_readme_results_are_quoted_from_results_md():
    """Each row of the README's results table is a row of RESULTS.md: the same contender, the same figures."""
    results = [set(_cells(line)) for line in _read("benchmarks/RESULTS.md").splitlines() if line.startswith("|")]
    table = [line for line in _section(README, "Results").splitlines() if line.startswith("|")]
    rows = [_cells(line) for line in table[2:]]  # after the header and its rule
    assert rows, "the README's Results section has no table"
    for label, *figures in rows:
        assert any(label in row and set(figures) <= row for row in results), (
            f"README's results row {label!r} {figures} is not a row of benchmarks/RESULTS.md"
        )


# ---------------------------------------------------------------- links and commands


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = _without_code_blocks(_read(path))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code_blocks(_read(page))):
            if re.match(r"[a-z]+:", target):  # https://..., mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(REPO_ROOT, resolved)):
                broken.append(f"{page}: {target} (no {resolved})")
            elif anchor and (not resolved.endswith(".md") or anchor not in _anchors(resolved)):
                broken.append(f"{page}: {target} (no heading #{anchor} in {resolved})")
    assert not broken, "\n".join(broken)


def test_every_command_named_exists():
    named = {(page, word) for page in PAGES for word in re.findall(r"python -m mnist_flax ([a-z_]+)", _read(page))}
    unknown = sorted(f"{page}: python -m mnist_flax {word}" for page, word in named if word not in COMMANDS)
    assert not unknown, f"commands that python -m mnist_flax does not have: {unknown}"
    # The commands run as `python -m mnist_flax COMMAND`; the README says once that there is no per-module form.
    module_forms = {page: re.findall(r"python -m mnist_flax\.\w+", _read(page)) for page in PAGES}
    assert len(module_forms.pop("README.md")) <= 1
    assert not any(module_forms.values()), module_forms
