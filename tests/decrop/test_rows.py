"""Tests for decrop.rows: Cohen's result files (ours and his), full-precision radii, and the summaries."""

import pytest

from decrop.rows import (CertRow, average_certified_radius, certified_accuracy, certified_counts, parse_seconds,
                         read_rows, write_rows)

ABSTAIN = -1
ROWS = [
    CertRow(0, 3, 3, 0.75, 1, 1.25),
    CertRow(20, 1, ABSTAIN, 0.0, 0, 0.5),
    CertRow(40, 2, 5, 0.4, 0, 0.5),  # certified, but wrong
    CertRow(60, 0, 0, 0.25, 1, 0.5),
    CertRow(80, 4, 4, 0.0004, 1, 0.5),
]

# The first lines of two files written by Cohen et al.'s own code/certify.py, verbatim (radius as {:.3}, time as
# str(datetime.timedelta)), from github.com/locuslab/smoothing at 78a4d94:
# data/certify/cifar10/resnet110/noise_0.12/test/sigma_0.12
COHEN_CIFAR10 = """\
idx	label	predict	radius	correct	time
0	3	-1	0.0	0	0:00:13.736080
20	7	7	0.0734	1	0:00:13.771528
40	4	4	0.405	1	0:00:13.907949
60	7	7	0.457	1	0:00:13.988746
80	8	8	0.457	1	0:00:14.025411
100	4	4	0.129	1	0:00:14.059316
120	8	8	0.289	1	0:00:14.088397
140	6	6	0.175	1	0:00:14.093301
160	2	2	0.164	1	0:00:14.106578
180	0	0	0.449	1	0:00:14.105998
"""
# data/certify/imagenet/resnet50/noise_0.25/test/sigma_0.25
COHEN_IMAGENET = """\
idx	label	predict	radius	correct	time
0	0	0	0.165	1	0:02:31.238689
100	2	2	0.978	1	0:02:28.472100
200	4	395	0.0504	0	0:02:29.734734
300	6	6	0.978	1	0:02:29.500387
400	8	8	0.978	1	0:02:30.348481
500	10	10	0.849	1	0:02:29.899296
600	12	12	0.0511	1	0:02:29.689873
700	14	14	0.978	1	0:02:29.582000
800	16	16	0.978	1	0:02:29.844638
900	18	18	0.117	1	0:02:30.467950
"""


def test_write_read_round_trip_keeps_every_digit(tmp_path) -> None:
    rows = ROWS + [CertRow(100, 1, 1, 0.12345678901234567, 1, 2.345678, 1100)]
    path = tmp_path / "cert.tsv"
    write_rows(rows, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples"
    assert lines[-1] == "100\t1\t1\t0.12345678901234566\t1\t2.345678\t1100"
    assert read_rows(path) == rows


def test_a_radius_just_below_r_is_not_certified_at_r_after_a_round_trip(tmp_path) -> None:
    """0.24996 printed with 4 decimals would read back as 0.2500 and count as certified at r = 0.25."""
    path = tmp_path / "cert.tsv"
    write_rows([CertRow(0, 1, 1, 0.24996, 1, 0.1), CertRow(1, 1, 1, 0.25, 1, 0.1)], path)
    back = read_rows(path)
    assert [row.radius for row in back] == [0.24996, 0.25]
    assert certified_counts(back, [0.25]) == {0.25: 1}
    assert certified_counts(back[:1], [0.0, 0.2499, 0.25]) == {0.0: 1, 0.2499: 1, 0.25: 0}


@pytest.mark.parametrize("text, first, last", [
    (COHEN_CIFAR10, CertRow(0, 3, -1, 0.0, 0, 13.73608), CertRow(180, 0, 0, 0.449, 1, 14.105998)),
    (COHEN_IMAGENET, CertRow(0, 0, 0, 0.165, 1, 151.238689), CertRow(900, 18, 18, 0.117, 1, 150.46795)),
])
def test_files_written_by_cohens_code_are_read(tmp_path, text: str, first: CertRow, last: CertRow) -> None:
    path = tmp_path / "cohen.tsv"
    path.write_text(text)
    rows = read_rows(path)
    assert len(rows) == 10
    for got, expected in ((rows[0], first), (rows[-1], last)):
        assert got == CertRow(**{**expected.__dict__, "time": pytest.approx(expected.time, abs=1e-9)})
    assert all(row.samples == 0 for row in rows)  # Cohen's files have no samples column


def test_imagenet_excerpt_summaries() -> None:
    rows = [CertRow(int(f[0]), int(f[1]), int(f[2]), float(f[3]), int(f[4]), parse_seconds(f[5]))
            for f in (line.split("\t") for line in COHEN_IMAGENET.splitlines()[1:])]
    assert certified_accuracy(rows, [0.0, 0.5, 0.978]) == {0.0: 0.9, 0.5: 0.6, 0.978: 0.5}


@pytest.mark.parametrize("text, seconds", [
    ("13.7", 13.7), ("0:00:13.736080", 13.73608), ("0:02:31", 151.0), ("12:00:00.5", 43200.5),
    ("1 day, 2:03:04", 93784.0), ("2 days, 0:00:00.000001", 172800.000001),
])
def test_parse_seconds(text: str, seconds: float) -> None:
    assert parse_seconds(text) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize("text", ["", "0:0:1", "1:00", "abc", "0:00:1x"])
def test_parse_seconds_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_seconds(text)


@pytest.mark.parametrize("text", [
    "",
    "idx label predict radius correct time\n0 1 1 0.5 1 0.1\n",
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\n",
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\tcat\t1\t0.5\t1\t0.1\n",
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:xx\n",
])
def test_read_rows_rejects_malformed_files(tmp_path, text: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match="bad.tsv"):
        read_rows(path)


def test_certified_accuracy_and_acr() -> None:
    acc = certified_accuracy(ROWS, [0.0, 0.25, 0.5, 1.0])
    assert acc == {0.0: 3 / 5, 0.25: 2 / 5, 0.5: 1 / 5, 1.0: 0.0}
    assert average_certified_radius(ROWS) == pytest.approx((0.75 + 0.25 + 0.0004) / 5)
    with pytest.raises(ValueError):
        certified_accuracy([], [0.0])
