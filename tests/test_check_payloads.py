"""`evaluator check` on data carried in code: the honest submissions pass with margin, and each way of
carrying the public validation split (or other data) in a submission folder is refused with a finding
that names the file and line, through the real CLI on real folders."""

import base64
import json
import lzma
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evaluator import check
from evaluator.cli import main
from evaluator.paths import HOME

TEMPLATE = HOME / "submissions" / "template"
HONEST = {
    "reference": HOME / "reference",
    "template": TEMPLATE,
    "seed-moe": HOME / "submissions" / "seed-moe",
    "nanogpt-style": Path(__file__).parent / "fixtures" / "submissions" / "nanogpt-style",
}
VAL_SPLIT = HOME / "spec" / "datasets" / "pydoc-100k" / "val.parquet"
# Each honest figure must sit at most this share of its limit: room for honest code to grow.
HONEST_SHARE_OF_LIMIT = 0.6


def _val_rows() -> list[dict]:
    return pq.read_table(VAL_SPLIT, columns=["text", "tokens"]).to_pylist()


def _val_tokens() -> list[int]:
    return [token for row in _val_rows() for token in row["tokens"]]


def _packed(tokens: list[int]) -> bytes:
    """Token ids as 16-bit integers, xz-compressed: how an attacker makes them small."""
    return lzma.compress(b"".join(token.to_bytes(2, "little") for token in tokens), preset=9 | lzma.PRESET_EXTREME)


@pytest.fixture
def submission(tmp_path: Path) -> Path:
    folder = tmp_path / "template"  # a submission's name is its folder's
    shutil.copytree(TEMPLATE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def _check(folder: Path, capsys) -> tuple[int, str]:
    code = main(["check", str(folder)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _add_to_train(folder: Path, text: str) -> int:
    """Append `text` to the template's train.py; returns the line number its first line lands on."""
    path = folder / "train.py"
    before = path.read_text()
    path.write_text(before + text)
    return before.count("\n") + 1


@pytest.mark.parametrize("name", HONEST)
def test_honest_submissions_pass_with_margin(name, capsys):
    folder = HONEST[name]
    code, output = _check(folder, capsys)
    assert code == 0, output
    for limit, figure in check.scan_folder(folder).figures().items():
        assert figure <= HONEST_SHARE_OF_LIMIT * getattr(check, limit), f"{name}: {limit} measured {figure}"


def test_the_fixture_is_a_realistic_size():
    fixture = HONEST["nanogpt-style"]
    lines = sum(path.read_text().count("\n") for path in fixture.glob("*.py"))
    assert 300 <= lines <= 500, lines


def _whole_split_base85(folder: Path) -> list[str]:
    payload = base64.b85encode(_packed(_val_tokens())).decode()
    assert 15_000 < len(payload) < 20_000  # the ~19 KB of the measured attack
    (folder / "val_data.py").write_text(f'"""Constants."""\n\nVAL = (\n    "{payload}"\n)\n')
    return [
        "val_data.py:4:5: a string literal of",
        "val_data.py:4:5: 1 piece(s) of text (string literal;",
        "read like encoded data",
    ]


def _quarter_in_seven_strings(folder: Path) -> list[str]:
    tokens = _val_tokens()
    payload = base64.b85encode(_packed(tokens[: len(tokens) // 4])).decode()
    assert 4_000 < len(payload) <= 7 * 700
    chunks = [payload[i : i + 700] for i in range(0, len(payload), 700)]
    assert len(chunks) == 7
    first = _add_to_train(folder, "".join(f'\nPART_{i} = "{chunk}"' for i, chunk in enumerate(chunks)) + "\n")
    return [
        f"train.py:{first + 1}:10: a string literal of 700 characters",
        f"train.py:{first + 1}:10: 7 piece(s) of text",
    ]


def _quarter_in_many_short_strings(folder: Path) -> list[str]:
    """Each literal shorter than any one piece is judged by: only the file's short pieces together tell."""
    tokens = _val_tokens()
    payload = base64.b85encode(_packed(tokens[: len(tokens) // 4])).decode()
    chunks = [payload[i : i + 12] for i in range(0, len(payload), 12)]
    body = "\n".join(f"    {json.dumps(chunk)}," for chunk in chunks)
    first = _add_to_train(folder, f"\nPARTS = [\n{body}\n]\n")
    # 12-character strings, so the list holds hundreds of constants too.
    return [
        f"train.py:{first + 1}:9: lists {len(chunks)} constants in one list",
        f"train.py:{first + 2}:5: ",
        "piece(s) of text (string literal;",
    ]


def _token_ids_as_a_list(folder: Path) -> list[str]:
    tokens = _val_tokens()
    first = _add_to_train(folder, f"\nVAL_TOKENS = [{', '.join(map(str, tokens))}]\n")
    return [
        f"train.py:{first + 1}:14: lists {len(tokens):,} constants in one list",
        f"train.py:{first + 1}: the folder's number literals take",
    ]


def _token_ids_in_short_lists(folder: Path) -> list[str]:
    """Lists short enough for the per-list limit: the folder's count of number characters still tells."""
    tokens = _val_tokens()[:2000]
    rows = [tokens[i : i + 20] for i in range(0, len(tokens), 20)]
    rows[7].append(1234567890)  # the line with the most number characters, which the finding names
    first = _add_to_train(folder, "".join(f"\nROW_{i} = {row}" for i, row in enumerate(rows)) + "\n")
    return [f"train.py:{first + 8}: the folder's number literals take", "the limit is 1,024"]


def _floats_as_a_tuple(folder: Path) -> list[str]:
    values = [round(token / 8192, 6) for token in _val_tokens()[:500]]
    first = _add_to_train(folder, f"\nSCALES = ({', '.join(map(str, values))})\n")
    return [f"train.py:{first + 1}:10: lists 500 constants in one tuple"]


def _base85_in_comments(folder: Path) -> list[str]:
    tokens = _val_tokens()
    payload = base64.b85encode(_packed(tokens[: len(tokens) // 4])).decode()
    comment = "\n".join("# " + payload[i : i + 76] for i in range(0, len(payload), 76))
    first = _add_to_train(folder, "\n" + comment + "\n")
    return [f"train.py:{first + 1}:1: ", "(comment;", "read like encoded data"]


def _hex_bytes_literal(folder: Path) -> list[str]:
    blob = _packed(_val_tokens()[:1500])
    escaped = "".join(f"\\x{byte:02x}" for byte in blob)
    first = _add_to_train(folder, f'\nBLOB = b"{escaped}"\n')
    return [f"train.py:{first + 1}:8: a bytes literal of {len(blob):,} characters", "(bytes literal;"]


def _base32_docstring(folder: Path) -> list[str]:
    """One case, few class changes: base32 gives itself away by its lack of vowels."""
    payload = base64.b32encode(_packed(_val_tokens()[:1500])).decode()
    wrapped = "\n".join(payload[i : i + 64] for i in range(0, len(payload), 64))
    first = _add_to_train(folder, f'\n\ndef notes():\n    """{wrapped}"""\n')
    return [f"train.py:{first + 3}:5: 1 piece(s) of text (docstring;", "read like encoded data"]


def _implicitly_joined_f_string(folder: Path) -> list[str]:
    payload = base64.b64encode(_packed(_val_tokens()[:1500])).decode()
    pieces = "\n".join(f'    f"{payload[i : i + 60]}{{0}}"' for i in range(0, len(payload), 60))
    first = _add_to_train(folder, f"\nJOINED = (\n{pieces}\n)\n")
    return [f"train.py:{first + 2}:5: ", "read like encoded data"]


def _json_file_beside_the_code(folder: Path) -> list[str]:
    (folder / "data.json").write_text(json.dumps({"tokens": _val_tokens()[:3000]}))
    return ["data.json:1: 1 piece(s) of text (line;"]


def _raw_text_in_docstrings(folder: Path) -> list[str]:
    """The split as plain text: it reads like documentation, so only its amount tells."""
    texts = [row["text"].replace("\\", "/").replace('"""', "'''") for row in _val_rows()]
    functions = "".join(f'\n\ndef note_{i}():\n    """{text}"""\n' for i, text in enumerate(texts))
    _add_to_train(folder, functions)
    return [
        "/train.py:",
        "bytes of comments, docstrings, string literals and other text, and passes the limit of 24,576 here",
    ]


def _wide_alphabet_comments(folder: Path) -> list[str]:
    """Fifteen bits a character in CJK ideographs: few class changes, but outside ASCII."""
    blob = _packed(_val_tokens()[:1500])
    bits = "".join(f"{byte:08b}" for byte in blob)
    chars = "".join(chr(0x4E00 + int(bits[i : i + 14].ljust(14, "0"), 2) % 20000) for i in range(0, len(bits), 14))
    first = _add_to_train(folder, "\n" + "\n".join("# " + chars[i : i + 40] for i in range(0, len(chars), 40)) + "\n")
    return [f"train.py:{first + 1}: the folder holds", "characters outside ASCII", "(the first: U+"]


def _decoders_called(folder: Path) -> list[str]:
    first = _add_to_train(
        folder,
        (
            "\nimport codecs\nimport lzma as _l\nimport pickle\nfrom base64 import b85decode\n\n"
            "BLOB = _l.decompress(b85decode(b''))\n"
            "HEX = bytes.fromhex('00ff')\n"
            "TEXT = codecs.decode(b'00', 'hex')\n"
            "OBJECT = pickle.loads(BLOB)\n"
            "ZIPPED = __import__('zlib').decompress(HEX)\n"
        ),
    )
    decoder = "(), which decodes, decompresses or deserialises"
    return [
        f"train.py:{first + 4}:1: uses b85decode{decoder}",
        f"train.py:{first + 6}:8: uses decompress{decoder}",
        f"train.py:{first + 6}:22: uses b85decode{decoder}",
        f"train.py:{first + 7}:7: uses fromhex{decoder}",
        f"train.py:{first + 8}:8: uses decode{decoder}",
        f"train.py:{first + 9}:10: uses loads{decoder}",
        f"train.py:{first + 10}:10: uses decompress{decoder}",
    ]


def _config_array_of_token_ids(folder: Path) -> list[str]:
    path = folder / "manifest.toml"
    text = path.read_text().replace("margin_s = 3.0", f"margin_s = 3.0\nwarm_tokens = {_val_tokens()[:500]}", 1)
    path.write_text(text)
    line = text.split("\n").index(next(line for line in text.split("\n") if line.startswith("warm_tokens"))) + 1
    return [f"manifest.toml:{line}:1: a [config] value here is an array of 500 items; the limit is 64"]


def _config_long_string(folder: Path) -> list[str]:
    payload = base64.b85encode(_packed(_val_tokens()[:2000])).decode()
    path = folder / "manifest.toml"
    text = path.read_text().replace("margin_s = 3.0", f'margin_s = 3.0\nnotes = "{payload}"', 1)
    path.write_text(text)
    line = text.split("\n").index(next(line for line in text.split("\n") if line.startswith("notes"))) + 1
    return [
        f"manifest.toml:{line}:1: a [config] value here is a string of {len(payload):,} characters",
        f"manifest.toml:{line}: 1 piece(s) of text (line;",
    ]


def _config_many_keys(folder: Path) -> list[str]:
    path = folder / "manifest.toml"
    text = path.read_text()
    path.write_text(
        text.replace("margin_s = 3.0", "margin_s = 3.0\n" + "\n".join(f"k{i} = {i}" for i in range(400)), 1)
    )
    line = next(number for number, line in enumerate(text.split("\n"), 1) if line.startswith("[config]"))
    return [f"manifest.toml:{line}:1: [config] and its overrides hold 412 keys and values; the limit is 256"]


def _names_that_carry_the_split(folder: Path) -> list[str]:
    """A channel no specific check knows (assignments to random names): the compressed size bounds it."""
    payload = base64.b32encode(_packed(_val_tokens())).decode().rstrip("=").lower()
    names = [payload[i : i + 24] for i in range(0, len(payload), 24)]
    _add_to_train(folder, "\n" + "\n".join(f"_{name} = None" for name in names) + "\n")
    return ["template/.: the folder's files compress (xz) to"]


ATTACKS = [
    _whole_split_base85,
    _quarter_in_seven_strings,
    _quarter_in_many_short_strings,
    _token_ids_as_a_list,
    _token_ids_in_short_lists,
    _floats_as_a_tuple,
    _base85_in_comments,
    _hex_bytes_literal,
    _base32_docstring,
    _implicitly_joined_f_string,
    _json_file_beside_the_code,
    _raw_text_in_docstrings,
    _wide_alphabet_comments,
    _decoders_called,
    _config_array_of_token_ids,
    _config_long_string,
    _config_many_keys,
    _names_that_carry_the_split,
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.__name__.strip("_") for attack in ATTACKS])
def test_data_carried_in_the_folder_is_refused_with_its_place(submission, attack, capsys):
    expected = attack(submission)
    code, output = _check(submission, capsys)
    assert code == 2, output
    for fragment in expected:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    assert "Traceback" not in output
    # Findings describe what they found; none quotes it.
    assert not re.search(r"[A-Za-z0-9+/=]{40}", output.replace(str(submission), "")), output
    assert output.isascii(), output


def test_findings_name_the_file_and_line_in_json(submission, capsys):
    _quarter_in_seven_strings(submission)
    assert main(["check", "--json", str(submission)]) == 2
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert findings and all(f["file"] == "train.py" and f["line"] for f in findings), findings


def test_a_python_file_that_does_not_parse_is_judged_as_text(submission, capsys):
    payload = base64.b85encode(_packed(_val_tokens()[:1500])).decode()
    (submission / "helper.py").write_text(
        "def broken(:\n" + "\n".join(payload[i : i + 70] for i in range(0, len(payload), 70)) + "\n"
    )
    code, output = _check(submission, capsys)
    assert code == 2 and "helper.py:2: " in output and "read like encoded data" in output, output


def test_a_text_file_that_is_not_utf8_is_refused(submission, capsys):
    (submission / "notes.txt").write_bytes(b"plain start\n" + bytes(range(128, 256)) * 4)
    code, output = _check(submission, capsys)
    assert code == 2 and "notes.txt: holds bytes that are not UTF-8 text (at byte 12)" in output, output


def test_encoding_what_a_run_reports_passes(submission, capsys):
    """Compressing and encoding (a report of what a run saw) unpacks nothing: only decoders are refused."""
    _add_to_train(
        submission, "\nimport base64\nimport zlib\n\nREPORT = base64.b64encode(zlib.compress(b'listing', 9)).decode()\n"
    )
    code, output = _check(submission, capsys)
    assert code == 0, output


def test_a_few_short_regular_expressions_and_formulas_pass(submission, capsys):
    """What makes honest text look encoded, in honest amounts: regular expressions, shapes, formulas."""
    _add_to_train(
        submission,
        (
            '\nNAME = r"^[a-z0-9][a-z0-9-]{1,62}$"  # x = (W @ h) * 2**-0.5\n'
            'SHAPES = "[B, T, 3C] -> [B, H, T, C/H]"\n'
            "# d2 = sqrt(d1^2 - g1*g2); min_pos = x2 - (x2 - x1)*((g2 + d2 - d1)/(g2 - g1 + 2*d2))\n"
        ),
    )
    code, output = _check(submission, capsys)
    assert code == 0, output
