"""What the switch and the workers ask of a batch of frames, in C and in the reference (issue 15).

The switch groups a batch by destination and learns its sources once per
distinct MAC; a receiver's MTU check looks for the long frames; a batch
handed to another worker is a copy.  Each is computed in C on the hot path,
without a Python object per frame, and must agree with the reference twin.
"""

from __future__ import annotations

import pytest

from iovirt.virtio.net import _datapath_py, datapath

TWINS = pytest.mark.parametrize("frames_cls", [_datapath_py.Frames, datapath.Frames], ids=["python", "selected"])


@TWINS
def test_frames_subset_copies_frames_and_checksums(frames_cls):
    f = frames_cls()
    f.append(bytes(range(14)) + b"a" * 10, (14, 4))
    f.append(bytes(range(1, 15)) + b"b" * 30)
    f.append(bytes(range(2, 16)) + b"c" * 5, (20, 6))
    sub = f.subset([2, 0])
    assert len(sub) == 2
    assert sub.frame(0) == f.frame(2) and sub.csum(0) == (20, 6)
    assert sub.frame(1) == f.frame(0) and sub.csum(1) == (14, 4)
    assert sub.macs() == ([f.macs()[0][2], f.macs()[0][0]], [f.macs()[1][2], f.macs()[1][0]])
    f.clear()  # the sender reuses its buffer: the copy keeps its frames
    f.append(bytes(14))
    assert sub.frame(0).endswith(b"c" * 5)
    with pytest.raises(IndexError):
        f.subset([5])


@TWINS
def test_frames_extend_appends_copies_even_from_itself(frames_cls):
    """What a receive backlog holds: frames of another batch appended behind its own (a port's backlog)."""
    f, g = frames_cls(), frames_cls()
    f.append(bytes(range(14)) + b"a" * 10, (14, 4))
    g.append(bytes(range(1, 15)) + b"b" * 3000)  # more than the first buffer's room: it grows
    g.append(bytes(range(2, 16)) + b"c" * 5, (20, 6))
    first = f.frame(0)
    f.extend(g, [1, 0])
    assert [f.frame(i) for i in range(3)] == [first, g.frame(1), g.frame(0)]
    assert [f.csum(i) for i in range(3)] == [(14, 4), (20, 6), None]
    dst, src = g.macs()
    assert f.macs()[0][1:] == [dst[1], dst[0]] and f.macs()[1][1:] == [src[1], src[0]]
    f.extend(f, [0, 1])
    assert len(f) == 5 and f.frame(3) == first and f.frame(4) == g.frame(1) and f.csum(4) == (20, 6)
    with pytest.raises(IndexError):
        f.extend(g, [0, 2])
    assert len(f) == 5, "a bad index appends nothing"


@TWINS
@pytest.mark.parametrize("distinct", [1, 3, 16, 17, 40])
def test_frames_sources_and_groups_agree_with_the_macs(frames_cls, distinct):
    f = frames_cls()
    for i in range(100):
        src, dst = (0x020000000000 + i % distinct).to_bytes(6, "big"), (0x0200000000FF - i % 3).to_bytes(6, "big")
        f.append(dst + src + b"\x08\x00" + bytes(46))
    dsts, srcs = f.macs()
    assert f.sources() == list(dict.fromkeys(srcs))
    groups = f.groups()
    assert [d for d, _ in groups] == list(dict.fromkeys(dsts))
    assert sorted(i for _, idx in groups for i in idx) == list(range(100))
    assert all(dsts[i] == d for d, idx in groups for i in idx)
    assert frames_cls().groups() == [] and frames_cls().sources() == []


@TWINS
def test_frames_longer_finds_the_long_ones(frames_cls):
    f = frames_cls()
    for n in (60, 1514, 1515, 9000, 14):
        f.append(bytes(n))
    assert f.longer(1514, range(5)) == [2, 3]
    assert f.longer(1514, [3, 0]) == [3]
    with pytest.raises(IndexError):
        f.longer(10, [7])
