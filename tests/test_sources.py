from __future__ import annotations

import tracemalloc
from datetime import date
from pathlib import Path

import openpyxl
import orjson
import pytest

from blastd.errors import SourceError
from blastd.sources import JSON_CHUNK_CHARS, PHONE_COLUMNS, read_recipients


def write_xlsx(path: Path, rows: list[list[object]]) -> Path:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    for row in rows:
        sheet.append(row)
    workbook.save(path)
    return path


def test_xlsx_rows_become_recipients_with_lower_snake_vars(tmp_path: Path) -> None:
    path = write_xlsx(
        tmp_path / "list.xlsx",
        [
            ["Nama", "No HP", "Kode", "Jumlah", "Harga", "Tanggal"],
            ["Budi", 6281234567890.0, "X1", 3.0, 2.5, date(2026, 11, 22)],
            ["Sari", 6281234567891, None, 4, None, None],
            ["Andi", "0812-3456-7892", "", None, None, None],
            [None, None, None, None, None, None],
        ],
    )
    assert list(read_recipients(path)) == [
        {
            "to": "6281234567890",
            "vars": {
                "nama": "Budi",
                "kode": "X1",
                "jumlah": "3",
                "harga": "2.5",
                "tanggal": "2026-11-22T00:00:00",
            },
        },
        {"to": "6281234567891", "vars": {"nama": "Sari", "jumlah": "4"}},
        {"to": "0812-3456-7892", "vars": {"nama": "Andi"}},
    ]


@pytest.mark.parametrize(
    "header", ["PHONE", "WhatsApp", "wa number", "WA-Number", " msisdn ", "no_hp"]
)
def test_phone_column_is_found_case_insensitively(tmp_path: Path, header: str) -> None:
    path = write_xlsx(tmp_path / "list.xlsx", [["name", header], ["Budi", "+6281234567890"]])
    assert list(read_recipients(path)) == [{"to": "+6281234567890", "vars": {"name": "Budi"}}]


def test_xlsx_without_a_phone_column_names_file_and_expected_columns(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "people.xlsx", [["name", "email"], ["Budi", "b@x.test"]])
    with pytest.raises(SourceError) as caught:
        list(read_recipients(path))
    message = str(caught.value)
    assert "people.xlsx" in message
    assert all(column in message for column in PHONE_COLUMNS)


def test_file_that_is_not_xlsx_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "fake.xlsx"
    path.write_text("phone\n0812\n")
    with pytest.raises(SourceError, match=r"fake\.xlsx"):
        list(read_recipients(path))


def test_csv_with_bom_and_semicolons(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_bytes("nomor;nama;kota\r\n0812-3456-7890;Budi; Jakarta \r\n".encode("utf-8-sig"))
    assert list(read_recipients(path)) == [
        {"to": "0812-3456-7890", "vars": {"nama": "Budi", "kota": "Jakarta"}}
    ]


def test_csv_with_quoted_commas_and_short_rows(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text('name,phone,note\n"Budi, Jr.",+6281234567890,"a, b"\nSari,0812\n\n')
    assert list(read_recipients(path)) == [
        {"to": "+6281234567890", "vars": {"name": "Budi, Jr.", "note": "a, b"}},
        {"to": "0812", "vars": {"name": "Sari"}},
    ]


def test_csv_that_is_not_utf8_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("phone,name\n0812,Jos\xe9\n".encode("latin-1"))
    with pytest.raises(SourceError, match="not UTF-8"):
        list(read_recipients(path))


def test_empty_csv_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(SourceError, match="header"):
        list(read_recipients(path))


def test_json_list_of_objects_strings_and_numbers(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    elements = [
        {"to": "+6281234567890", "vars": {"name": "Budi", "n": 3, "p": 2.5}},
        "0812-3456-7891",
        6281234567892,
        {"to": "+6281234567893"},
    ]
    path.write_bytes(orjson.dumps(elements, option=orjson.OPT_INDENT_2))
    assert list(read_recipients(path)) == [
        {"to": "+6281234567890", "vars": {"name": "Budi", "n": "3", "p": "2.5"}},
        {"to": "0812-3456-7891", "vars": {}},
        {"to": "6281234567892", "vars": {}},
        {"to": "+6281234567893", "vars": {}},
    ]


def test_json_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(" [ ] ")
    assert list(read_recipients(path)) == []


def test_json_number_cut_by_a_chunk_boundary_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    padding = " " * (JSON_CHUNK_CHARS - 6)
    path.write_text(f"[{padding}6281234567890, 6281234567891]")
    assert [row["to"] for row in read_recipients(path)] == ["6281234567890", "6281234567891"]


def test_json_spanning_many_chunks_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    count = 30_000
    with path.open("w") as file:
        file.write("[")
        file.write(
            ",".join(f'{{"to": "+628123{i:07d}", "vars": {{"i": {i}}}}}' for i in range(count))
        )
        file.write("]")
    assert path.stat().st_size > 15 * JSON_CHUNK_CHARS
    tracemalloc.start()
    try:
        seen = 0
        for row in read_recipients(path):
            assert row["to"] == f"+628123{seen:07d}"
            seen += 1
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert peak_bytes < path.stat().st_size / 4


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"to": "+62"}', "expected a JSON array"),
        ('[{"to": "+62"}, {"vars": {}}]', "element 1"),
        ('[{"to": "+62", "vars": {"a": [1]}}]', "element 0"),
        ('[{"to": true}]', "element 0"),
        ('["+62", null]', "element 1"),
        ('["+62" "+63"]', "expected ',' or ']'"),
        ('["+62", ', "invalid JSON"),
        ('[{"to": "+62"', "invalid JSON"),
    ],
)
def test_malformed_json_is_a_source_error_naming_the_file(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SourceError) as caught:
        list(read_recipients(path))
    assert "bad.json" in str(caught.value)
    assert problem in str(caught.value)


def test_unsupported_extension_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"list\.txt.*\.xlsx, \.csv or \.json"):
        read_recipients(tmp_path / "list.txt")
