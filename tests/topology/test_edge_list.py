from pathlib import Path

import numpy as np
import pytest

from gossamer.topology import make_topology


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "graph.txt"
    path.write_text(text)
    return path


def test_parses_comments_blank_lines_and_duplicates(tmp_path):
    path = write(tmp_path, "# a path\n0 1\n\n2 1  # reversed\n1 0\n  3\t2\n")
    topology = make_topology("edge_list", 4, 0, path=str(path))
    np.testing.assert_array_equal(topology.edges, [[0, 1], [1, 2], [2, 3]])
    assert topology.is_connected()


def test_disconnected_edge_list_is_reported(tmp_path):
    path = write(tmp_path, "0 1\n2 3\n")
    assert not make_topology("edge_list", 4, 0, path=path).is_connected()
    isolated = make_topology("edge_list", 5, 0, path=write(tmp_path, "0 1\n1 2\n2 3\n"))
    assert isolated.degrees()[4] == 0 and not isolated.is_connected()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0 1\n# ok\n1 7\n", ":3: node id 7 is outside 0..4"),
        ("0 1\n-1 2\n", ":2: node id -1"),
        ("0 x\n", ":1: expected two integer node ids"),
        ("0 1 0.5\n", ":1: expected two integer node ids"),
        ("0\n", ":1: expected two integer node ids"),
        ("1 2\n3 3\n", ":2: self-loop on node 3"),
    ],
)
def test_bad_lines_name_the_line(tmp_path, text, match):
    with pytest.raises(ValueError, match=match) as info:
        make_topology("edge_list", 5, 0, path=write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        make_topology("edge_list", 5, 0, path=tmp_path / "absent.txt")
    with pytest.raises(ValueError, match="needs parameter.*path"):
        make_topology("edge_list", 5, 0)
