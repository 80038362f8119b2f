"""`evaluator check` over generated malformed manifests: whatever a competitor writes, the answer is
exit 0 or 2 with findings, never an exception.

The generator is seeded, so every run tries the same cases and a failure names the case that
reproduces it. Each case is the template's manifest with a few mutations of the kinds that have
broken TOML tools before: deep nesting, huge numbers, dates, control characters, cut or spliced
text, bytes that are not UTF-8, and random values put where the schema wants something else.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time

import pytest

from evaluator.cli import main
from evaluator.paths import HOME

# The slow tier (`make test-fast` leaves it out): every test here checks hundreds of generated manifests.
pytestmark = pytest.mark.slow

TEMPLATE = HOME / "submissions" / "template"
SEED = 18
CASES = 600
# Characters that mean something to TOML, to the schema or to a terminal.
ALPHABET = list("[]{}\"'=.,#\\\n\r\t 0123456789-+_:aeTZnfi") + [
    "\x00",
    "\x1b",
    "\x7f",
    "\x85",
    "\x9b",
    "\u2028",
    "\ufeff",
]
KEYS = [
    "schema",
    "submission",
    "name",
    "track",
    "authors",
    "description",
    "licence",
    "entry",
    "module",
    "function",
    "config",
    "tracks",
    "cpu-1min",
    "t4-5min",
    "d_model",
]
TABLES = [
    "[config]",
    "[submission]",
    "[entry]",
    "[tracks.cpu-1min.config]",
    "[tracks.t4-5min]",
    "[[config]]",
    "[config.sub]",
    "[tracks]",
]


def _string(rng: random.Random) -> str:
    chars = "".join(rng.choice(ALPHABET + list("abcXYZ<>|*`")) for _ in range(rng.randint(0, 12)))
    escaped = chars.replace("\\", "\\\\").replace('"', '\\"')
    # Escapes TOML turns into control characters, so that they reach the schema.
    escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def _value(rng: random.Random, depth: int = 0) -> str:
    kinds = ["int", "float", "bool", "string", "date", "time", "datetime", "bigint", "special"]
    if depth < 12:
        kinds += ["array", "table"]
    kind = rng.choice(kinds)
    if kind == "int":
        return str(rng.choice([0, 1, -1, 2**63 - 1, 2**63, -(2**63) - 1, rng.randint(-(10**30), 10**30)]))
    if kind == "float":
        return rng.choice(["1e300", "-0.0", "3.25", "1e999", "6.02e23", "0.1"])
    if kind == "bool":
        return rng.choice(["true", "false"])
    if kind == "string":
        return _string(rng)
    if kind == "date":
        return "1979-05-27"
    if kind == "time":
        return "07:32:00.999"
    if kind == "datetime":
        return rng.choice(["1979-05-27T07:32:00Z", "1979-05-27 07:32:00", "1979-05-27T00:32:00-07:00"])
    if kind == "bigint":
        return "9" * rng.choice([19, 400, 4300, 4301, 6000])
    if kind == "special":
        return rng.choice(["nan", "-inf", "+inf", "0x_1", "0o777", "0b101", "1_000", "'''multi\nline'''", '"""a\nb"""'])
    if kind == "array":
        return "[" + ", ".join(_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    return "{" + ", ".join(f"{rng.choice(KEYS)}{i} = {_value(rng, depth + 1)}" for i in range(rng.randint(0, 3))) + "}"


def _nesting(rng: random.Random) -> str:
    depth = rng.choice([8, 9, 50, 300, 1000, 3000, 20000])
    opener, closer = rng.choice([("[", "]"), ("{a = ", "}"), ("[{a = ", "}]")])
    closed = rng.random() < 0.8
    return f"deep = {opener * depth}1{closer * depth if closed else ''}"


def _mutate(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    mutation = rng.randrange(10)
    where = rng.randrange(len(lines) + 1)
    if mutation == 0:  # a key set to a random value
        lines.insert(where, f"{rng.choice(KEYS)} = {_value(rng)}")
    elif mutation == 1:  # an existing value replaced
        index = rng.randrange(len(lines))
        if "=" in lines[index]:
            lines[index] = lines[index].split("=", 1)[0] + "= " + _value(rng)
    elif mutation == 2:
        lines.insert(where, _nesting(rng))
    elif mutation == 3:
        lines.insert(where, rng.choice(TABLES))
    elif mutation == 4:  # characters sprinkled anywhere
        joined = "\n".join(lines)
        for _ in range(rng.randint(1, 5)):
            at = rng.randrange(len(joined) + 1)
            joined = joined[:at] + rng.choice(ALPHABET) + joined[at:]
        return joined
    elif mutation == 5:  # a span cut out
        joined = "\n".join(lines)
        start = rng.randrange(len(joined))
        return joined[:start] + joined[start + rng.randint(1, 80) :]
    elif mutation == 6:  # a line repeated or two lines swapped
        a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
        if rng.random() < 0.5:
            lines.insert(b, lines[a])
        else:
            lines[a], lines[b] = lines[b], lines[a]
    elif mutation == 7:  # truncated
        return "\n".join(lines)[: rng.randrange(len(text))]
    elif mutation == 8:  # free text with control characters or Markdown
        lines.insert(
            where,
            f"{rng.choice(['authors', 'description', 'name', 'licence'])} = "
            f"{rng.choice([_string(rng), '[' + _string(rng) + ']'])}",
        )
    else:  # a dotted key into the tables the schema knows
        lines.insert(
            where,
            f"{rng.choice(['tracks.cpu-1min.config', 'tracks.x', 'config', 'submission', 'entry'])}."
            f"{rng.choice(KEYS)} = {_value(rng)}",
        )
    return "\n".join(lines)


def _manifest_bytes(rng: random.Random, template: str) -> bytes:
    text = template
    for _ in range(rng.randint(1, 4)):
        text = _mutate(rng, text)
    data = text.encode("utf-8", errors="surrogatepass")
    if rng.random() < 0.05:  # not UTF-8
        at = rng.randrange(len(data) + 1)
        data = data[:at] + bytes([rng.choice([0xFF, 0xC3, 0x80, 0xED])]) + data[at:]
    return data


_RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def test_check_never_raises_on_generated_manifests(tmp_path, capsys):
    folder = tmp_path / "template"  # the template's name: a submission's name is its folder's
    shutil.copytree(TEMPLATE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    template = (TEMPLATE / "manifest.toml").read_text()
    rng = random.Random(SEED)
    outcomes = {0: 0, 2: 0}
    started = time.monotonic()
    for case in range(CASES):
        data = _manifest_bytes(rng, template)
        (folder / "manifest.toml").write_bytes(data)
        as_json = case % 2 == 1
        shown = data[:300].decode("utf-8", errors="replace")
        try:
            code = main(["check", *(["--json"] if as_json else []), str(folder)])
        except BaseException as exc:  # noqa: BLE001 - any exception at all is the failure sought
            pytest.fail(
                f"case {case} (seed {SEED}): check raised {type(exc).__name__}: {exc}\nmanifest begins: {shown!r}"
            )
        out, err = capsys.readouterr()
        assert code in outcomes, f"case {case}: exit {code}\n{out}{err}\nmanifest begins: {shown!r}"
        outcomes[code] += 1
        assert "Traceback" not in out + err
        # Findings quote what the manifest holds, escaped: nothing raw reaches the terminal.
        assert not _RAW_CONTROL.search(out + err), f"case {case}: raw control character in {out + err!r}"
        if as_json:
            report = json.loads(out)
            assert report["ok"] is (code == 0)
            lines = data.count(b"\n") + 1
            for finding in report["findings"]:
                if finding["file"] == "manifest.toml" and finding["line"] is not None:
                    assert 1 <= finding["line"] <= lines, f"case {case}: {finding} beyond line {lines}"
        elif code == 2:
            assert "problem(s); the submission is invalid" in err
    # The generator must reach both sides; and stay quick enough to run in every test session.
    assert outcomes[0] > 0 and outcomes[2] > CASES // 2, outcomes
    assert time.monotonic() - started < 60
