"""Pure client pieces: the error mapping, the backoff policy, frame checks, CLI inputs."""

from __future__ import annotations

import random

import grpc
import numpy as np
import pytest

from seqserve.client import (
    Backoff,
    InvalidInput,
    ModelNotFound,
    PermissionDenied,
    PositionConflict,
    ServerBusy,
    ServerError,
    SessionLost,
    SessionNotFound,
    Unavailable,
    VersionConflict,
    VersionUnavailable,
)
from seqserve.client.errors import error_from_rpc, error_from_status
from seqserve.client.frames import as_frames, as_sequences
from seqserve.client.inputs import InputError, load_recordings


class _Rpc(grpc.RpcError):
    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_status_codes_and_reasons_map_to_exceptions():
    gap = error_from_rpc(
        _Rpc(
            grpc.StatusCode.FAILED_PRECONDITION,
            "position 9 leaves a gap",
            (("seqserve-reason", "position_gap"), ("seqserve-expected-position", "7")),
        )
    )
    assert isinstance(gap, PositionConflict) and (gap.reason, gap.position) == ("position_gap", 7)
    lost = error_from_status(
        5,
        "session 'a' expired at position 3",
        reason="expired",
        session_id="a",
        position=3,
        in_session=True,
    )
    assert isinstance(lost, SessionLost) and isinstance(lost, SessionNotFound)
    assert isinstance(error_from_status(8, "session limit reached"), ServerBusy)
    assert isinstance(error_from_status(3, "bad"), InvalidInput)
    assert isinstance(error_from_status(3, "bad"), ValueError)
    down = error_from_rpc(
        _Rpc(
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: "
            "ipv4:127.0.0.1:1: Failed to connect to remote host: "
            "Connection refused",
        ),
        target="127.0.0.1:1",
    )
    assert isinstance(down, Unavailable)
    assert str(down) == "cannot reach the seqserve server at 127.0.0.1:1 (connection refused)"
    odd = error_from_status(grpc.StatusCode.INTERNAL, "internal\nerror")
    assert isinstance(odd, ServerError) and "\n" not in str(odd)


def test_model_repository_reasons_get_their_own_classes():
    expected = {
        ("unknown_model", grpc.StatusCode.NOT_FOUND): ModelNotFound,
        ("unknown_version", grpc.StatusCode.NOT_FOUND): ModelNotFound,
        ("version_mismatch", grpc.StatusCode.FAILED_PRECONDITION): VersionConflict,
        ("version_draining", grpc.StatusCode.FAILED_PRECONDITION): VersionConflict,
        ("version_retired", grpc.StatusCode.NOT_FOUND): SessionLost,
        ("version_unavailable", grpc.StatusCode.UNAVAILABLE): VersionUnavailable,
        ("not_allowed", grpc.StatusCode.PERMISSION_DENIED): PermissionDenied,
    }
    for (reason, code), kind in expected.items():
        for in_session in (False, True):  # in a stream or not: the same class
            error = error_from_status(code.value[0], "m", reason=reason, in_session=in_session)
            assert type(error) is kind and (error.code, error.reason) == (code, reason)
    # The position and session classes keep their old reasons.
    assert type(error_from_status(5, "m", reason="expired")) is SessionNotFound
    assert type(error_from_status(9, "m", reason="position_gap")) is PositionConflict
    # Catching the broader classes still works.
    assert issubclass(VersionUnavailable, Unavailable) and issubclass(SessionLost, SessionNotFound)
    assert issubclass(ModelNotFound, LookupError) and issubclass(PermissionDenied, PermissionError)
    assert isinstance(error_from_status(7, "no"), PermissionDenied)  # no reason: by code
    # An UNAVAILABLE with a seqserve reason keeps the server's words (they name the version);
    # only the transport's own UNAVAILABLE is rewritten into "cannot reach".
    gone = error_from_rpc(
        _Rpc(
            grpc.StatusCode.UNAVAILABLE,
            "model 'm' version 3 is unavailable: step.onnx: checksum does not match",
            (("seqserve-reason", "version_unavailable"),),
        ),
        target="127.0.0.1:1",
    )
    assert isinstance(gone, VersionUnavailable) and str(gone).startswith("model 'm' version 3")


def test_backoff_grows_to_its_cap_with_bounded_jitter():
    policy = Backoff(
        initial=0.1, maximum=1.0, multiplier=2.0, jitter=0.2, max_attempts=5, max_elapsed=3.0
    )
    rng = random.Random(0)
    for attempt, base in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        assert base * 0.8 <= policy.delay(attempt, rng) <= base * 1.2
    assert policy.allows(4, 2.9) and not policy.allows(5, 0.0) and not policy.allows(0, 3.0)
    assert not Backoff.none().allows(0, 0.0)


def test_frames_are_checked_before_sending():
    assert as_frames([1, 2, 3], 3).shape == (1, 3)
    assert as_frames(np.zeros((4, 3), np.float64), 3).dtype == np.float32
    with pytest.raises(InvalidInput, match="2 features per frame, the model expects 3"):
        as_frames(np.zeros((4, 2)), 3)
    with pytest.raises(InvalidInput, match="frame 1 holds NaN"):
        as_frames([[0, 0, 0], [0, np.inf, 0]], 3)
    with pytest.raises(InvalidInput):
        as_frames(np.zeros((0, 3)), 3)
    padded = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    assert [len(s) for s in as_sequences(padded, [5, 2], 3)] == [5, 2]
    with pytest.raises(InvalidInput, match="length 6"):
        as_sequences(padded, [6, 2], 3)


def test_recordings_from_csv_and_npy(tmp_path):
    csv = tmp_path / "rec.csv"
    csv.write_text("a,b\n1,2\n3,4\n\n5,6\n")
    (rec,) = load_recordings(str(csv))
    assert rec.frames.tolist() == [[1, 2], [3, 4], [5, 6]] and rec.name == "rec.csv"
    csv.write_text("1,2\n3\n")
    with pytest.raises(InputError, match=r"rec.csv:2: 1 columns"):
        load_recordings(str(csv))
    npy = tmp_path / "many.npy"
    np.save(npy, np.zeros((3, 4, 2), np.float32))
    assert [r.name for r in load_recordings(str(npy))] == [f"many.npy[{i}]" for i in range(3)]
    with pytest.raises(InputError, match="no such file"):
        load_recordings(str(tmp_path / "missing.csv"))


def test_sample_selections(tmp_path, monkeypatch):
    path = tmp_path / "samples.npz"
    np.savez(
        path,
        x=np.zeros((5, 4, 2), np.float32),
        lengths=np.array([4, 3, 4, 2, 4]),
        y=np.array(["a", "b", "a", "b", "a"]),
    )
    monkeypatch.setenv("SEQSERVE_SAMPLES", str(path))

    def names(source):
        return [r.name for r in load_recordings(source)]

    assert names("samples") == [f"sample:{i}" for i in range(5)]
    assert names("samples:2") == names("samples[:2]") == ["sample:0", "sample:1"]
    assert names("samples[3:]") == ["sample:3", "sample:4"]
    (one,) = load_recordings("sample:1")
    assert (one.frames.shape, one.truth) == ((3, 2), "b")
    for bad in ("sample:7", "sample:x", "samples[a]", "samples:0"):
        with pytest.raises(InputError):
            load_recordings(bad)


def test_samples_of_the_named_bundled_model(monkeypatch):
    monkeypatch.delenv("SEQSERVE_SAMPLES", raising=False)
    (vowel,) = load_recordings("sample:3", "japanesevowels")
    (motion,) = load_recordings("sample:3")  # the default: basicmotions
    assert (vowel.frames.shape[1], motion.frames.shape[1]) == (12, 6)
    assert vowel.truth is not None
    for model in ("nope", "../basicmotions", ".hidden"):
        with pytest.raises(InputError, match=r"no samples are bundled with model .*japanesevowels"):
            load_recordings("sample:0", model)


def test_a_token_that_cannot_be_a_header_is_refused_up_front():
    import pytest

    from seqserve.client import Client

    with pytest.raises(ValueError, match="printable ASCII"):
        Client("127.0.0.1:1", token="s\u00e9cret")
