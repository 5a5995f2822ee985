"""``run sh "..."`` against real shells: no value is ever shell code, and each arrives whole.

A ``run sh`` step becomes ``/bin/sh -c SCRIPT sh VALUE...``: the script holds ``"$1"``,
``"${12}"`` where the pipeline has placeholders, and the values travel as the shell's positional
parameters. These tests plan real pipeline files (parse, check, plan) and run the planned argv
with ``bash -c`` and ``dash -c`` in place of ``/bin/sh`` (on many clusters ``/bin/sh`` is bash):

* every value — any text without NUL: quotes, ``$(...)``, backticks, backslashes, newlines,
  ``;``, ``*``, non-ASCII, a leading ``-`` — arrives as exactly the words the pipeline means,
  wherever the placeholder stands in plain shell text (alone, glued to text, a list);
* for scripts made of shell punctuation, any that ``opf check`` accepts never runs a value as a
  command, whatever the values (the checker refuses placeholders inside quotes, after a
  backslash, in arithmetic and the like).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opals_dsl.api import load, plan
from opals_dsl.errors import PipelineError

SHELLS = [s for s in ("/bin/bash", "/usr/bin/bash", "/bin/dash", "/usr/bin/dash")
          if os.path.exists(s)]
BASH = next((s for s in SHELLS if s.endswith("bash")), None)
DASH = next((s for s in SHELLS if s.endswith("dash")), None)
pytestmark = pytest.mark.skipif(BASH is None or DASH is None, reason="needs bash and dash")

MARKER = "INJECTED"
#: a value that bash's trace (-x) shows as one word, unless the shell split it
SPLIT = "Q1 Q2"
#: values that run a command if the shell ever parses them as code, or splits them at a
#: command's place
PAYLOADS = [
    f"$(touch {MARKER})", f"`touch {MARKER}`", f";touch {MARKER};", f"'; touch {MARKER}; '",
    f'"; touch {MARKER}; "', f"a[$(touch {MARKER})]", f"touch {MARKER}", f"\ntouch {MARKER}\n",
    f"$((a[$(touch {MARKER})]))", f"\\'$(touch {MARKER})\\'", SPLIT, "-n", "*", "\\", "'", '"',
]

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)


def opf_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pipeline_text(script: str) -> str:
    """A one-step pipeline running ``script`` (shell text with ``{p0}``, ``{p1}``, ``{xs}``,
    ``{o}`` placeholders) as ``run sh``."""
    return (
        'param p0 = ""\nparam p1 = ""\nparam xs = ["x"]\n'
        "job j {\n    step s {\n        out o = \"words.bin\"\n"
        f"        run sh {opf_string(script)}\n    }}\n}}\n"
    )


def planned_argv(folder: Path, script: str, values: dict[str, object]) -> list[str] | None:
    """The argv opf plans for ``script`` with these param values; None if opf refuses it."""
    path = folder / "p.opf"
    path.write_text(pipeline_text(script), encoding="utf-8")
    try:
        loaded = load(path)
    except PipelineError:
        return None
    loaded.params.update(values)  # any text, not only what --param can spell
    graph = plan(loaded)
    return graph.nodes["exec:j/0/s"]["argv"]


def run_with(
    shell: str, argv: list[str], cwd: Path, *, trace: bool = False
) -> subprocess.CompletedProcess:
    """``argv`` with ``shell`` in place of /bin/sh (tracing each command with -x); the whole
    process group is killed if it outlives the timeout."""
    assert argv[:2] == ["/bin/sh", "-c"] and argv[3] == "sh", argv
    args = [shell, *(["-x"] if trace else []), *argv[1:]]
    proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# -- every value arrives whole -----------------------------------------------------------------

_any_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)
_values = st.one_of(st.sampled_from(PAYLOADS), _any_text,
                    st.builds(lambda a, b: "-" + a + b, _any_text, st.sampled_from(PAYLOADS)))
_literal = st.text(alphabet="abcXYZ019._=+,:@%/-", min_size=1, max_size=4).filter(
    lambda t: t[0] not in "=~"
)


@st.composite
def _words(draw: st.DrawFn) -> list[list[str]]:
    """Shell words, each a list of pieces: literal text or a placeholder (``{xs}``, a list,
    only as a word of its own)."""
    words = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 5)) == 0:
            words.append(["{xs}"])
            continue
        pieces = draw(st.lists(st.one_of(_literal, st.sampled_from(["{p0}", "{p1}"])),
                               min_size=1, max_size=4))
        words.append(pieces)
    return words


@SETTINGS
@given(words=_words(), p0=_values, p1=_values, xs=st.lists(_values, max_size=3))
def test_every_value_reaches_the_script_as_exactly_the_words_meant_in_bash_and_dash(
    words: list[list[str]], p0: str, p1: str, xs: list[str]
) -> None:
    """Invariant: for placeholders in plain shell text (alone, glued to text, a list as its own
    word), the words a script receives are exactly the literal text joined with the values —
    one word per list item — under bash and dash, and no value runs as a command."""
    values = {"p0": p0, "p1": p1, "xs": tuple(xs)}
    # a first word of its own: printf with no argument would still print its format once
    script = "printf '%s\\0' start " + " ".join("".join(w) for w in words) + " > {o}"
    expected = ["start"]
    for w in words:
        if w == ["{xs}"]:
            expected.extend(xs)
        else:
            expected.append("".join(str(values[p[1:-1]]) if p[0] == "{" else p for p in w))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        argv = planned_argv(folder, script, values)
        assert argv is not None, script
        assert MARKER not in argv[2]  # no value is part of the script the shell parses
        for shell in (BASH, DASH):
            cwd = folder / Path(shell).name
            cwd.mkdir()
            done = run_with(shell, argv, cwd)
            assert done.returncode == 0, (shell, argv, done.stderr)
            got = (cwd / "words.bin").read_bytes().split(b"\0")
            assert got[-1] == b""
            assert [g.decode("utf-8", "surrogateescape") for g in got[:-1]] == expected, shell
            assert not (cwd / MARKER).exists(), (shell, argv)


# -- no accepted script runs a value -----------------------------------------------------------

# Scripts are built of shell punctuation, a few keywords and placeholders — but never a bare
# '(' after a word, so no script can define a function (and so no fork bomb).
#: what opens or escapes: each alone leaves the rest of a script inside something
_OPENERS = ["'", '"', "\\", "$", "`", "$(", "$((", "${{", "$'", '$"', "[[ ", "[", "a["]
_TOKENS = [
    " ", " ", " ", ")", "))", "}}", " ]]", "]", ";", "|", "&&", ">", "#", "-", "*", "=", "1",
    "a", "$1", "$@", "$*", " case ", " in ", " a) ", ";;", " esac", "{p0}", "{p1}", " {xs} ",
    "{o}",
]
#: ways to put shell text inside something: quotes, substitutions, arithmetic, ...
_WRAPPERS = [
    ("'", "'"), ('"', '"'), ("$(", ")"), ("$((", "))"), ("`", "`"), ("${{x:-", "}}"),
    ("[[ ", " ]]"), ("$'", "'"), ('$"', '"'), ("a[", "]=1"), ("\\", ""), ("$", ""),
    ("$(case x in a) ", ";; esac)"), ("echo ", ""), ("", " "),
]
#: a placeholder with what stands right before and after it
_placed = st.tuples(
    st.sampled_from(["", " ", *_OPENERS, *_TOKENS[:10]]),
    st.sampled_from(["{p0}", "{p1}", "{xs}", "{o}"]),
    st.sampled_from(["", " ", *_OPENERS, *_TOKENS[:10]]),
).map("".join)
_pieces = st.one_of(st.sampled_from(_TOKENS + _OPENERS), _placed)
_scripts = st.one_of(
    st.lists(_pieces, min_size=1, max_size=6).map("".join),
    st.recursive(
        _pieces,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=4).map("".join),
            st.tuples(st.sampled_from(_WRAPPERS), inner).map(lambda w: w[0][0] + w[1] + w[0][1]),
        ),
        max_leaves=6,
    ),
)
#: endings that close what a random script may have left open, so that more of them run
_ENDINGS = st.sampled_from(["", "", '"', "'", ")", "`", "}}", "))", " ]]", "]"])
#: every value twice: as it is, and after a value whose splitting bash's trace shows
_VALUES = st.sampled_from(PAYLOADS + [f"{SPLIT} {p}" for p in PAYLOADS])


@settings(SETTINGS, max_examples=300)  # most scripts are refused or fail at once
@given(script=st.tuples(_scripts, _ENDINGS).map("".join), p0=_VALUES, p1=_VALUES,
       xs=st.lists(_VALUES, max_size=2))
def test_no_script_that_opf_accepts_runs_a_value_as_a_command_in_bash_or_dash(
    script: str, p0: str, p1: str, xs: list[str]
) -> None:
    """Invariant: whatever shell text surrounds the placeholders, if ``opf check`` accepts the
    script, then neither bash nor dash ever runs a command written in a value, and bash's trace
    never shows a value split into words."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        argv = planned_argv(folder, script, {"p0": p0, "p1": p1, "xs": tuple(xs)})
        if argv is None:
            return  # refused: nothing runs
        for shell in (BASH, DASH):
            cwd = folder / Path(shell).name
            cwd.mkdir()
            # many of these scripts are not valid shell; no matter
            done = run_with(shell, argv, cwd, trace=shell == BASH)
            assert not (cwd / MARKER).exists(), (shell, script, argv)
            if shell == BASH:
                assert not split_in_trace(done.stderr), (script, argv, done.stderr)


def split_in_trace(trace: bytes) -> list[str]:
    """The lines of a bash trace (-x) that show the value SPLIT split into words."""
    split = []
    first = SPLIT.split()[0]
    for line in trace.decode("utf-8", "replace").splitlines():
        if not line.startswith("+") or first not in line:
            continue
        try:
            words = shlex.split(line.lstrip("+ "))
        except ValueError:
            continue  # a trace line of a value with a newline; not SPLIT's
        if any(first in w and SPLIT not in w for w in words):
            split.append(line)
    return split


# -- the hostile user's case, through the command line -----------------------------------------


def test_the_escaped_brace_injection_is_refused_by_opf_check(tmp_path: Path) -> None:
    (tmp_path / "p.opf").write_text(
        'param p = ""\njob j {\n    step s {\n        out o = "o.txt"\n'
        '        run sh "echo \\\\{p} \\\\\' > {o}"\n    }\n}\n', encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "opals_dsl", "check", "p.opf", "--param", f"p=$(touch {MARKER})"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'{p}' follows a backslash" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / MARKER).exists()


def test_a_script_names_each_value_once_and_lists_item_by_item(tmp_path: Path) -> None:
    argv = planned_argv(tmp_path, "cp {p0} {p0}.bak && cat {xs} {p1}{p1} > {o}",
                        {"p0": "a b", "p1": "c", "xs": ("d", "e")})
    assert argv == [
        "/bin/sh", "-c", 'cp "$1" "$1".bak && cat "$2" "$3" "$4""$4" > "$5"', "sh",
        "a b", "d", "e", "c", "words.bin",
    ]


@pytest.mark.parametrize("form", ["sh -c", "bash -c"])
def test_a_script_given_with_dash_c_gets_its_values_as_parameters_too(tmp_path: Path,
                                                                        form: str) -> None:
    """Invariant: ``run sh -c "SCRIPT"`` and ``run bash -c "SCRIPT"`` are planned as ``run sh
    "SCRIPT"`` is (with bash for bash): no value is part of the script the shell parses, so
    every payload arrives as exactly its text and none runs."""
    path = tmp_path / "p.opf"
    path.write_text('param p0 = ""\njob j {\n    step s {\n        out o = "words.bin"\n'
                    f'        run {form} "printf %s {{p0}} > {{o}}"\n    }}\n}}\n',
                    encoding="utf-8")
    program = form.split()[0]
    for payload in PAYLOADS:
        loaded = load(path)
        loaded.params["p0"] = payload
        argv = plan(loaded).nodes["exec:j/0/s"]["argv"]
        head = ["bash", "-c"] if program == "bash" else ["/bin/sh", "-c"]
        assert argv == [*head, 'printf %s "$1" > "$2"', program, payload, "words.bin"]
        for shell in (BASH, DASH) if program == "sh" else (BASH,):
            out = tmp_path / "words.bin"
            out.unlink(missing_ok=True)
            proc = run_with(shell, ["/bin/sh", *argv[1:3], "sh", *argv[4:]], tmp_path)
            assert proc.returncode == 0, proc.stderr
            assert out.read_bytes() == payload.encode()
            assert not (tmp_path / MARKER).exists(), (shell, payload)
