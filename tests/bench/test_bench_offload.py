"""Offload and header checks against iovirt's virtio-net, in-process and over a vhost-user socket."""

from __future__ import annotations

import pytest

from iovirt.bench.checks import (
    FAIL,
    NA,
    PASS,
    check_host_tso4,
    check_host_tso6,
    check_host_ufo,
    check_mrg_rxbuf,
    check_rx_data_valid,
    check_rx_header,
    check_tx_checksum,
    check_tx_checksum_udp_zero,
)
from iovirt.bench.pair import DEFAULT_FEATURES
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.net import _datapath_py, datapath
from iovirt.virtio.net.defs import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
)

NO_GUEST_CSUM = DEFAULT_FEATURES & ~(1 << VIRTIO_NET_F_GUEST_CSUM)
NO_MRG = DEFAULT_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF)
LEGACY_HDR = DEFAULT_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF) & ~(1 << VIRTIO_F_VERSION_1)


def verdict(result):
    assert result.verdict == PASS, result.reason
    return result


@pytest.mark.parametrize("b_features", [NO_GUEST_CSUM, NO_GUEST_CSUM & NO_MRG], ids=["mrg", "no-mrg"])
def test_tx_checksum_completed_for_receiver_without_guest_csum(make_pair, b_features):
    result = verdict(check_tx_checksum(make_pair(b_features=b_features)))
    assert "completed" in result.reason


def test_tx_checksum_passed_on_to_receiver_with_guest_csum(make_pair):
    pair = make_pair()
    verdict(check_tx_checksum(pair))
    # iovirt hands the partial checksum on: the receiver sees NEEDS_CSUM
    assert all(int(p.flags) == 1 for p in pair.b.received[-4:])


def test_tx_checksum_split_header_descriptor(make_pair):
    verdict(check_tx_checksum(make_pair(b_features=NO_GUEST_CSUM, a={"split_header": True})))


def test_tx_checksum_not_applicable_without_csum(make_pair):
    result = check_tx_checksum(make_pair(features=DEFAULT_FEATURES & ~(1 << VIRTIO_NET_F_CSUM)))
    assert result.verdict == NA and "VIRTIO_NET_F_CSUM" in result.reason


def test_tx_checksum_udp_zero_sent_as_ffff(make_pair):
    verdict(check_tx_checksum_udp_zero(make_pair(b_features=NO_GUEST_CSUM)))


@pytest.mark.parametrize(
    "b_features", [DEFAULT_FEATURES, NO_GUEST_CSUM, NO_MRG, LEGACY_HDR], ids=["default", "no-guest-csum", "no-mrg", "legacy-10-byte"]
)
def test_rx_header(make_pair, b_features):
    pair = make_pair(b_features=b_features)
    verdict(check_rx_header(pair))
    assert pair.b.hdr_size == (10 if b_features == LEGACY_HDR else 12)


@pytest.fixture(params=["cython", "python"])
def data_path(request, monkeypatch):
    """Run the device's data path in C (``_datapath_c``) or in Python (``_datapath_py``)."""
    if request.param == "cython":
        if datapath.accel is None:
            pytest.skip("the _datapath_c extension is not loaded (IOVIRT_NO_EXTENSIONS=1)")
    else:
        monkeypatch.setattr(datapath, "accel", None)
        monkeypatch.setattr(datapath, "Frames", _datapath_py.Frames)
    return request.param


def test_rx_data_valid_set_when_negotiated(make_pair, data_path):
    # 5.1.6.4.1: DATA_VALID is a MAY; iovirt sets it on every frame whose checksum it verified, never on a wrong one.
    result = verdict(check_rx_data_valid(make_pair(), required=True))
    assert "DATA_VALID on 4 of 4 frames with right checksums, none on the 4 wrong ones" in result.reason


def test_rx_data_valid_not_with_pending_checksum(make_pair, data_path):
    # A frame handed on with NEEDS_CSUM has no complete checksum to validate: NEEDS_CSUM only.
    pair = make_pair()
    verdict(check_tx_checksum(pair))
    assert all(int(p.flags) == VIRTIO_NET_HDR_F_NEEDS_CSUM for p in pair.b.received[-4:])


def test_rx_data_valid_not_applicable_without_guest_csum(make_pair):
    assert check_rx_data_valid(make_pair(b_features=NO_GUEST_CSUM)).verdict == NA


@pytest.mark.parametrize("size", [128, 256, 1024])
def test_mrg_rxbuf_num_buffers_with_small_buffers(make_pair, size):
    pair = make_pair(b={"rx_buffer_size": size})
    verdict(check_mrg_rxbuf(pair))
    assert max(p.num_buffers for p in pair.b.received) == -(-(1514 + 12) // size)


def test_mrg_rxbuf_not_applicable_without_feature(make_pair):
    assert check_mrg_rxbuf(make_pair(b_features=NO_MRG, b={"rx_buffer_size": 256})).verdict == NA


def test_mrg_rxbuf_not_applicable_when_every_frame_fits_one_buffer(make_pair):
    assert check_mrg_rxbuf(make_pair(b={"rx_buffer_size": 2048})).verdict == NA


@pytest.mark.parametrize("check", [check_host_tso4, check_host_tso6])
def test_host_tso_segments_as_the_reference(make_pair, check):
    # iovirt offers HOST_TSO4/6 and segments at ingress: every segment as scapy's reference.
    verdict(check(make_pair()))


def test_host_ufo_not_applicable(make_pair):
    result = check_host_ufo(make_pair())
    assert result.verdict == NA and "does not offer" in result.reason
    pytest.skip(result.reason)


def test_check_reports_fail_not_exception(make_pair):
    """A receive ring that was disabled delivers nothing: the check fails with the reason instead of raising."""
    pair = make_pair(b={"timeout": 0.2})
    target = pair.b.target
    if make_pair.target == "in-process":
        target.device.set_queue_enabled(0, False)
    else:
        target.driver.frontend.set_vring_enable(0, False)
    result = check_rx_header(pair)
    assert result.verdict == FAIL and "BenchTimeout" in result.reason and "0 of 4" in result.reason
