"""Every command the README and the docs show must run against the code as it is.

From README.md, classification/README.md and every docs/*.md (a page that does not exist is simply not
read, e.g. a page still being written), the test takes the shell commands in fenced code blocks, indented
code blocks and inline code spans that run a script of the repository (``python tools/X.py ...``,
``python classification/X.py ...``, ``python benchmarks/X.py ...``, ``torchrun ... classification/train.py``,
``bash X.sh``, or a span that starts with such a script) and checks that

* the script exists;
* every ``--flag`` given to it is an option of the script's argparse parser (up to an option that takes the
  rest of the line, such as tools/demo.py's ``--opts``);
* every ``configs/...yaml`` / ``classification/configs/...yaml`` path mentioned anywhere in those files
  exists (``{a,b}`` alternatives and ``*`` patterns must each match a file).

Placeholders (CFG, FILE, OUT.json, ...) are values, not flags, and are not checked. The parsers are read in
one separate Python process that runs each script as ``__main__`` and stops it at its first
``parse_known_args`` call, so no script does any work and none needs a particular way of building its parser.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_RE = re.compile(r"^(?:\./)?((?:tools|classification|benchmarks)/[\w-]+\.(?:py|sh))$")
LAUNCHERS = {"python", "python3", "torchrun", "bash", "sh"}
CONFIG_RE = re.compile(r"(?<![\w/.-])((?:classification/)?configs/[\w.{},*/-]*?\.yaml)")
FENCE_RE = re.compile(r"^ {0,3}(```|~~~)")


def doc_files() -> List[str]:
    files = ["README.md", os.path.join("classification", "README.md")]
    files += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return [f for f in files if os.path.isfile(os.path.join(ROOT, f))]


# ---------------------------------------------------------------------------------------------- extraction
def code_snippets(text: str) -> List[str]:
    """Fenced and indented code blocks (one snippet per logical line) and inline code spans."""
    snippets, prose, block, in_fence = [], [], [], False
    lines = text.splitlines()
    for line in lines:
        if FENCE_RE.match(line):
            in_fence = not in_fence
            prose.append("")
            continue
        if in_fence:
            block.append(line)
            prose.append("")
        elif line.startswith("    ") and line.strip() and not line.lstrip().startswith(("-", "*", "|")):
            block.append(line)
            prose.append(line)  # an indented line can also be a list continuation: read it as prose too
        else:
            prose.append(line)
    logical = re.sub(r"\\\n\s*", " ", "\n".join(block))  # join continuation lines
    snippets += [ln.strip() for ln in logical.splitlines() if ln.strip()]
    snippets += [m.group(1).replace("\n", " ") for m in re.finditer(r"`([^`]+)`", "\n".join(prose))]
    return snippets


def _tokens(snippet: str) -> List[str]:
    try:
        lex = shlex.shlex(snippet, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        return list(lex)
    except ValueError:  # unbalanced quotes in prose: a plain split is enough to find flags
        return snippet.split()


@dataclass
class Command:
    script: str
    args: List[str] = field(default_factory=list)
    text: str = ""


def commands_in(snippet: str) -> List[Command]:
    """The repository scripts that ``snippet`` runs, with the arguments each gets."""
    found, segment = [], []
    for tok in _tokens(snippet) + [";"]:
        if tok in {";", "&&", "||", "|", "&", "(", ")"} or set(tok) <= set("|&;()"):
            found += _command_of(segment, snippet)
            segment = []
        else:
            segment.append(tok)
    return found


def _command_of(tokens: List[str], text: str) -> List[Command]:
    for i, tok in enumerate(tokens):
        m = SCRIPT_RE.match(tok)
        if not m:
            continue
        before = tokens[:i]
        if i == 0 or any(os.path.basename(t) in LAUNCHERS for t in before):
            return [Command(m.group(1), tokens[i + 1:], text)]
        return []
    return []


def config_paths(text: str) -> List[str]:
    return sorted(set(CONFIG_RE.findall(text)))


def _expand_braces(path: str) -> List[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    out = []
    for alt in m.group(1).split(","):
        out += _expand_braces(path[:m.start()] + alt + path[m.end():])
    return out


def missing_configs(path: str, doc: str) -> List[str]:
    """The expansions of ``path`` that match no file (relative to the root, or to the doc's folder)."""
    bases = [ROOT, os.path.join(ROOT, os.path.dirname(doc))]
    return [p for p in _expand_braces(path)
            if not any(glob.glob(os.path.join(base, p)) for base in bases)]


# ------------------------------------------------------------------------------------------------- parsers
def _dump_options(scripts: List[str]) -> Dict[str, dict]:
    """Run in a fresh process: each script as ``__main__``, stopped at its first argument parse."""
    import argparse
    import runpy

    class Captured(BaseException):
        def __init__(self, parser):
            self.parser = parser

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    argparse.ArgumentParser.parse_known_args = capture
    sys.path.insert(0, ROOT)
    out = {}
    for script in scripts:
        argv0 = sys.argv[:]
        sys.argv = [script, "--help"]
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            out[script] = {"error": "the script returned without parsing its arguments"}
        except Captured as c:
            actions = c.parser._actions
            out[script] = {
                "options": sorted(o for a in actions for o in a.option_strings),
                "remainder": sorted(o for a in actions if a.nargs == argparse.REMAINDER for o in a.option_strings),
            }
        except BaseException as e:  # noqa: BLE001  (reported by the test, with the script's name)
            out[script] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            sys.argv = argv0
    return out


def parser_options(scripts: List[str]) -> Dict[str, dict]:
    if not scripts:
        return {}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--dump-options", *scripts],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"reading the scripts' parsers failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the checks
def collect():
    """``(commands, configs)``: ``[(doc, Command)]`` and ``[(doc, path)]``."""
    commands, configs = [], []
    for doc in doc_files():
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        for snippet in code_snippets(text):
            commands += [(doc, c) for c in commands_in(snippet)]
        configs += [(doc, p) for p in config_paths(text)]
    return commands, configs


def problems(commands, configs, options: Dict[str, dict]) -> List[str]:
    out = []
    for doc, cmd in commands:
        if not os.path.isfile(os.path.join(ROOT, cmd.script)):
            out.append(f"{doc}: `{cmd.text}`: the script {cmd.script} does not exist")
            continue
        if not cmd.script.endswith(".py"):
            continue
        info = options.get(cmd.script, {})
        if "error" in info:
            out.append(f"{doc}: `{cmd.text}`: could not read the parser of {cmd.script}: {info['error']}")
            continue
        known, remainder = set(info["options"]), set(info["remainder"])
        for tok in cmd.args:
            flag = tok.strip("[]").split("=", 1)[0]
            if not flag.startswith("--") or flag == "--" or not re.match(r"^--[\w-]+$", flag):
                continue
            if flag not in known:
                out.append(f"{doc}: `{cmd.text}`: {cmd.script} has no option {flag}")
            if flag in remainder:
                break  # the rest of the line belongs to this option (e.g. demo's --opts KEY VALUE ...)
    for doc, path in configs:
        for miss in missing_configs(path, doc):
            out.append(f"{doc}: config file {miss} does not exist" + (f" (from {path})" if miss != path else ""))
    return out


def test_docs_commands_match_the_code():
    commands, configs = collect()
    assert len(commands) >= 20, f"found only {len(commands)} commands in {doc_files()}: is the extraction broken?"
    assert any(c.script == "tools/train_net.py" for _, c in commands)
    scripts = sorted({c.script for _, c in commands
                      if c.script.endswith(".py") and os.path.isfile(os.path.join(ROOT, c.script))})
    found = problems(commands, configs, parser_options(scripts))
    assert not found, "the docs show commands the code does not accept:\n" + "\n".join(found)


def test_extraction_finds_flags_and_configs():
    """The parts of the check on a made-up page: a bogus flag, a missing config, a missing script."""
    page = "\n".join([
        "Run `python tools/train_net.py --config-file configs/quickstart/semfpn_metaspike_tiny_shapes.yaml`.",
        "```bash",
        "python tools/demo.py --config-file CFG --input a.png \\",
        "    --no-such-flag --opts MODEL.WEIGHTS W --not-a-flag-of-demo",
        "torchrun --nproc_per_node 8 classification/train.py --config classification/configs/none.yaml",
        "python tools/missing_script.py --x",
        "```",
    ])
    cmds = [c for s in code_snippets(page) for c in commands_in(s)]
    assert [c.script for c in cmds] == ["tools/demo.py", "classification/train.py", "tools/missing_script.py",
                                        "tools/train_net.py"]
    options = {"tools/demo.py": {"options": ["--config-file", "--input", "--opts"], "remainder": ["--opts"]},
               "classification/train.py": {"options": ["--config"], "remainder": []},
               "tools/train_net.py": {"options": ["--config-file"], "remainder": []}}
    found = problems([("page.md", c) for c in cmds], [("page.md", p) for p in config_paths(page)],
                     options)
    assert any("tools/demo.py has no option --no-such-flag" in p for p in found), found
    assert not any("no option --not-a-flag-of-demo" in p for p in found), found  # after --opts: config overrides
    assert any("tools/missing_script.py does not exist" in p for p in found), found
    assert any("classification/configs/none.yaml does not exist" in p for p in found), found
    assert len(found) == 3, found
    assert missing_configs("configs/quickstart/*_d4.yaml", "README.md") == []
    assert missing_configs("configs/quickstart/{semfpn,nope}_metaspike_tiny_shapes.yaml", "README.md") == [
        "configs/quickstart/nope_metaspike_tiny_shapes.yaml"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--dump-options":
    result = _dump_options(sys.argv[2:])
    sys.stdout.flush()
    print(json.dumps(result))
