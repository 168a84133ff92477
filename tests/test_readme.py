"""The README cannot drift from the CLI: every shell command of its Quickstart and image-workflow sections
runs here (in a scratch folder, with tiny sizes appended as overrides), its Python snippet runs as pasted
(with a tiny iteration count), and CI's test command is the README's."""

import re
import shlex
from pathlib import Path

import pytest
from tiny import TINY

from fdistill.apps import cli

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
TINY_BY_COMMAND = {
    "demo": ["teacher.steps=30", "teacher.hidden=16", "distill.iterations=4", "distill.batch_size=64", "num_eval=100",
             "runs=[js]"],
    "train-teacher": [*TINY, "teacher.iterations=2"],
    "distill": ["disc_hidden=8", "distill.iterations=2", "distill.batch_size=8"],
    "sample": ["--num-samples", "20"],
    "evaluate": [],
    "analyze-run": ["--num-samples", "64"],
}


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def shell_commands() -> list[str]:
    lines = []
    for title in ("Quickstart", "The image workflow"):
        for block in blocks(section(title), "bash"):
            lines += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    return lines


def test_ci_runs_the_readmes_test_command():
    test_command = next(line for line in shell_commands() if "pytest" in line)
    ci = shlex.split((ROOT / ".ci" / "run").read_text(), comments=True)
    for part in test_command.split("&&"):
        words = [w for w in shlex.split(part) if w != "-q"]
        assert all(w in ci for w in words), (part, ci)


def test_readme_shell_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in shell_commands():
        for part in line.split("&&"):
            words = shlex.split(part)
            if words[0].endswith("fdistill"):
                argv = [*words[1:], *TINY_BY_COMMAND[words[1]]]
                assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
                ran.append(words[1])
    assert ran == ["demo", "train-teacher", "distill", "sample", "evaluate", "analyze-run"]
    assert (tmp_path / "runs" / "js" / "samples" / "grid.png").is_file()
    assert (tmp_path / "runs" / "js" / "analysis" / "fig6.png").is_file()

    (snippet,) = blocks(section("The image workflow"), "python")
    assert '"distill.iterations=1500"' in snippet
    tiny = ", ".join(f'"{o}"' for o in ["distill.iterations=2", "distill.batch_size=8", "disc_hidden=8"])
    exec(compile(snippet.replace('"distill.iterations=1500"', tiny), "README.md", "exec"), {})
    assert (tmp_path / "runs" / "js-api" / "checkpoints" / "000000002").is_dir()


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_pages_exist_and_link_their_images(page):
    text = (ROOT / "docs" / page).read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / "docs" / target).exists(), (page, target)
    assert "REFERENCE-FACTS" not in text and "shared/" not in text


def test_no_file_cites_the_private_notes():
    """The package, its presets, docs and benchmarks stand on their own: none cites a file outside the project."""
    files = [p for pattern in ("fdistill/**/*.py", "fdistill/**/*.yaml", "benchmarks/*", "docs/*.md", "README.md")
             for p in ROOT.glob(pattern) if p.is_file() and p.suffix in (".py", ".yaml", ".md", ".sh")]
    assert len(files) > 50
    cited = [str(p.relative_to(ROOT)) for p in files
             if re.search(r"/work/shared|\.\./shared|[A-Z0-9]+-FACTS\.md", p.read_text())]
    assert cited == []
