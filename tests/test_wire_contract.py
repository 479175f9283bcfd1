"""The wire contract as a client written from proto/seqserve.proto alone meets it.

The proto's Error comment is the complete list of reasons: every reason the server code can put
on the wire (found by reading server/ with ``ast``) must be listed there with its status code, and
nothing listed may be dead; the README's table says the same. Bytes that are not a valid message
get INVALID_ARGUMENT ``undecodable`` on every method, in the stream for Stream and StreamBatch,
and the stream goes on for every other session on it."""

from __future__ import annotations

import ast
import asyncio
import importlib
import logging
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import step_request

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import to_matrix

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "seqserve.proto"
README = ROOT / "README.md"
SERVICE = "/seqserve.v1.SeqServe/"

# ``reason=<expression>`` that forward a reason chosen elsewhere (the literals reaching them are
# found on their own: tombstone reasons are the literals given to end/_end/bury). A new
# expression here must be looked at, and this set extended, by whoever adds it.
FORWARDED = {"reason", "tomb.reason", "session.ended", "exc.reason"}
TOMBSTONE_CALLS = {"end", "_end", "bury"}


# -- what the proto documents -----------------------------------------------------------------


def documented() -> dict[str, str]:
    """reason -> status code name, from the comment on Error.reason."""
    text = PROTO.read_text()
    block = text[text.index("message Error {") : text.index("string reason = 2;")]
    found: dict[str, str] = {}
    code = ""
    for line in block.splitlines():
        heading = re.match(r"\s*// ([A-Z_]+) \((\d+)\):", line)
        if heading:
            code = heading[1]
            assert grpc.StatusCode[code].value[0] == int(heading[2]), line
            continue
        entry = re.match(r"\s*//   ([a-z_]+)\s{2,}\S", line)
        if entry:
            assert code, f"reason {entry[1]} listed before any status code"
            assert entry[1] not in found, f"{entry[1]} listed twice"
            found[entry[1]] = code
    return found


def readme_table() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+)` \| `([A-Z_]+)` \|", README.read_text(), flags=re.M)
    table = dict(rows)
    assert len(table) == len(rows), "a reason appears twice in the README's table"
    return table


# -- what the server can send -----------------------------------------------------------------


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


# Fronts for other protocols, whose reasons travel on their own wire (server/oip: the Open
# Inference Protocol, documented in the README's Triton and KServe section). The core they share
# with SeqServe is scanned.
OTHER_WIRES = {"oip"}


def _modules() -> dict[str, ast.Module]:
    """Every module under server/ (subpackages too) that serves seqserve.v1 or the core, by
    dotted name below seqserve.server."""
    base = ROOT / "server"
    return {
        ".".join(p.relative_to(base).with_suffix("").parts): ast.parse(p.read_text(), str(p))
        for p in sorted(base.rglob("*.py"))
        if p.relative_to(base).parts[0] not in OTHER_WIRES
    }


def _error_classes(modules: dict[str, ast.Module]) -> dict[str, tuple[str, str | None]]:
    """Every SeqServeError subclass defined in server/: name -> (module, its own default)."""
    classes: dict[str, tuple[str, list[str], str | None]] = {}
    for module, tree in modules.items():
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            default = None
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and any(_name(t) == "reason" for t in stmt.targets)
                    and isinstance(stmt.value, ast.Constant)
                ):
                    default = stmt.value.value
            classes[node.name] = (module, [_name(b) for b in node.bases], default)

    def is_error(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name == "SeqServeError":
            return True
        if name not in classes or name in seen:  # e.g. class X(pb_grpc.X)
            return False
        return any(is_error(b, seen | {name}) for b in classes[name][1])

    return {
        name: (module, default)
        for name, (module, _, default) in classes.items()
        if name != "SeqServeError" and is_error(name)
    }


def _code_of(module: str, name: str) -> str:
    from seqserve.server.servicer import STATUS_CODES

    cls = getattr(importlib.import_module(f"seqserve.server.{module}"), name)
    return next(STATUS_CODES[k].name for k in cls.__mro__ if k in STATUS_CODES)


def _literals(value: ast.expr, where: str) -> list[str]:
    """The literal reasons an expression can give (``x or "unknown"``, ``a if c else "b"``);
    anything else in it must be a known forwarding expression."""
    if isinstance(value, ast.Constant):
        return [value.value]
    if isinstance(value, ast.BoolOp):
        return [r for v in value.values for r in _literals(v, where)]
    if isinstance(value, ast.IfExp):
        return _literals(value.body, where) + _literals(value.orelse, where)
    source = ast.unparse(value)
    assert source in FORWARDED, f"{where}: reason={source} is not a literal"
    return []


def raisable() -> dict[str, set[str]]:
    """reason -> the status codes it can be sent with ("" where the code is set elsewhere, as
    for metadata written next to an abort), from every way server/ makes a reason."""
    modules = _modules()
    errors = _error_classes(modules)
    found: dict[str, set[str]] = {}

    def add(reason: object, code: str, where: str) -> None:
        assert isinstance(reason, str) and reason, f"{where}: reason {reason!r}"
        found.setdefault(reason, set()).add(code)

    for name, (module, default) in errors.items():
        if default is not None:
            add(default, _code_of(module, name), f"{module}.{name}")
    codes = {c.name for c in grpc.StatusCode}
    for module, tree in modules.items():
        for node in ast.walk(tree):
            where = f"server/{module}.py:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                func = _name(node.func)
                assert func != "SeqServeError", f"{where}: raise a subclass, not SeqServeError"
                for kw in node.keywords:
                    if kw.arg != "reason":
                        continue
                    if func in errors:
                        code = _code_of(errors[func][0], func)
                    else:  # e.g. pb.Error(code=grpc.StatusCode.X.value[0], reason="...")
                        named = [
                            n.attr
                            for kw2 in node.keywords
                            if kw2.arg == "code"
                            for n in ast.walk(kw2.value)
                            if isinstance(n, ast.Attribute) and n.attr in codes
                        ]
                        code = named[0] if named else ""
                    for literal in _literals(kw.value, where):
                        add(literal, code, where)
                if func in TOMBSTONE_CALLS and len(node.args) >= 2:
                    reason = node.args[1]
                    if isinstance(reason, ast.Constant) and isinstance(reason.value, str):
                        add(reason.value, "NOT_FOUND", where)  # table.get raises it
            elif isinstance(node, ast.Tuple) and len(node.elts) == 2:
                key, value = node.elts
                if isinstance(key, ast.Constant) and key.value == "seqserve-reason":
                    if isinstance(value, ast.Constant):
                        add(value.value, "", where)
                    else:
                        assert ast.unparse(value) in FORWARDED, where  # the abort path
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                value = node.value
                if (
                    any(_name(t).endswith("Reason") for t in targets)
                    and isinstance(value, ast.Subscript)
                    and _name(value.value) == "Literal"
                ):  # e.g. EndReason = Literal["closed", "expired", "moved"]
                    for item in ast.walk(value.slice):
                        if isinstance(item, ast.Constant) and isinstance(item.value, str):
                            add(item.value, "NOT_FOUND", where)
    return found


def test_the_proto_documents_every_reason_the_server_can_send():
    docs = documented()
    sent = raisable()
    undocumented = sorted(set(sent) - set(docs))
    assert not undocumented, (
        f"reasons the server sends that the proto does not list: {undocumented}"
    )
    dead = sorted(set(docs) - set(sent))
    assert not dead, f"reasons the proto lists that the server never sends: {dead}"
    for reason, codes in sent.items():
        wrong = codes - {"", docs[reason]}
        assert not wrong, f"{reason}: documented as {docs[reason]}, sent with {wrong}"
    # the reasons the issue found missing or unexplained are there
    for reason in ("rolled_back", "session_moved", "store_unavailable", "duplicate_session"):
        assert reason in docs


def test_the_readme_lists_the_same_reasons_with_the_same_codes():
    assert readme_table() == documented()


def test_the_scanner_sees_what_it_must():
    """A guard on the guard: the scan finds reasons made each way the server makes them."""
    sent = raisable()
    assert sent["bad_request"] == {"INVALID_ARGUMENT"}  # a class default
    assert "RESOURCE_EXHAUSTED" in sent["principal_session_limit"]  # reason= on a class
    assert "NOT_FOUND" in sent["moved"]  # a tombstone
    assert "" in sent["unauthenticated"]  # metadata beside an abort
    assert sent["internal"] == {"INTERNAL"}  # a pb.Error built by hand
    assert "INVALID_ARGUMENT" in sent["undecodable"]


# -- undecodable bytes --------------------------------------------------------------------------


def _bad_utf8_step(session_id: str, position: int, tag: int) -> bytes:
    """A StepRequest whose session id is not UTF-8: what a C++/Go/Rust client can send."""
    placeholder = "Z" * len(session_id)
    frames = to_matrix(np.zeros((1, 6), np.float32))
    data = pb.StepRequest(
        session_id=placeholder, position=position, frames=frames, tag=tag
    ).SerializeToString()
    return data.replace(placeholder.encode(), session_id.encode("latin-1"))


GARBAGE = b"\x0a\x05ab"  # a length-delimited field cut short


def _raw(channel: grpc.aio.Channel, method: str, kind: str = "unary_unary"):
    return getattr(channel, kind)(SERVICE + method)  # no serializers: bytes in, bytes out


@pytest.mark.parametrize(
    "method",
    [
        "Step",
        "StepBatch",
        "Predict",
        "OpenSession",
        "GetSession",
        "ResetSession",
        "CloseSession",
        "GetModel",
    ],
)
async def test_undecodable_unary_calls_are_invalid_argument_not_unknown(server, method, caplog):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        for data in (GARBAGE, b"\xff", _bad_utf8_step("s\xe9", 1, 2)):
            if method == "GetModel" and data.startswith(b"\x0a\x02"):
                continue  # a valid ModelRequest with an unknown field: it decodes, rightly
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _raw(channel, method)(data)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert dict(err.value.trailing_metadata())["seqserve-reason"] == "undecodable"
            assert "not a valid seqserve.v1." in err.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_undecodable_message_on_a_stream_is_answered_in_it_and_the_stream_goes_on(
    server, samples, caplog
):
    x = samples["x"][0][:3]
    # frames (field 3) whose Matrix is cut short: the id, position and tag still read
    bad_frames = pb.StepRequest(session_id="mux-c", position=2, tag=9).SerializeToString()
    bad_frames += b"\x1a\x01\x08"
    requests = [
        step_request("mux-a", 0, x[:1], start=True, tag=1).SerializeToString(),
        _bad_utf8_step("\xff\xfe", 4, 77),  # not UTF-8: the id cannot come back, the rest does
        GARBAGE,
        step_request("mux-b", 0, x[:1], start=True, tag=3).SerializeToString(),
        bad_frames,
        step_request("mux-a", 1, x[1:2], tag=4).SerializeToString(),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def feed():
            while (item := await queue.get()) is not None:
                yield item

        call = _raw(channel, "Stream", "stream_stream")(feed())
        answers = []
        for data in requests:  # one at a time: each answer before the next request
            queue.put_nowait(data)
            answers.append(pb.StepResponse.FromString(await call.read()))
        queue.put_nowait(None)
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    bad_id, garbage, cut = answers[1], answers[2], answers[4]
    assert bad_id.error.reason == garbage.error.reason == cut.error.reason == "undecodable"
    assert bad_id.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (bad_id.session_id, bad_id.position, bad_id.tag) == ("", 4, 77)
    assert "UTF-8" in bad_id.error.message
    assert (garbage.session_id, garbage.position, garbage.tag) == ("", 0, 0)
    assert (cut.session_id, cut.position, cut.tag) == ("mux-c", 2, 9)
    assert [a.tag for a in answers] == [1, 77, 0, 3, 9, 4]
    for good in (answers[0], answers[3], answers[5]):
        assert not good.HasField("error")
    assert answers[5].next_position == 2  # mux-a went on after its neighbours' garbage
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_undecodable_batch_on_a_stream_batch_is_answered_in_it(server, samples):
    x = samples["x"][0][:1]
    good = pb.StepBatchRequest(
        session_ids=["sb-a"], positions=[0], frames=to_matrix(x), start=True, tag=8
    ).SerializeToString()
    # The id is not UTF-8; the tag (field 5) still reads.
    bad = pb.StepBatchRequest(session_ids=["ZZ"], tag=6).SerializeToString()
    bad = bad.replace(b"ZZ", b"\xc3\x28")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        call = _raw(channel, "StreamBatch", "stream_stream")(iter([bad, GARBAGE, good]))
        out = [pb.StepBatchResponse.FromString(r) async for r in call]
        assert await call.code() == grpc.StatusCode.OK
    by_tag = {r.tag: r for r in out}
    assert len(out) == 3 and set(by_tag) == {6, 0, 8}
    for tag in (6, 0):
        assert [(e.index, e.error.reason) for e in by_tag[tag].errors] == [(0, "undecodable")]
        assert by_tag[tag].probabilities.rows == 0
    assert not by_tag[8].errors and list(by_tag[8].next_positions) == [1]


# -- reasons the issue found misleading -------------------------------------------------------


async def test_a_malformed_step_batch_is_refused_whole_as_the_proto_says(stub, samples):
    x = samples["x"][0][:2].astype(np.float32)
    cases = {
        "bad_request": pb.StepBatchRequest(
            session_ids=["w1", "w2"], positions=[0], frames=to_matrix(x), start=True
        ),
        "bad_frames": pb.StepBatchRequest(
            session_ids=["w1", "w2"], positions=[0, 0], frames=to_matrix(x[:1]), start=True
        ),
    }
    for reason, request in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StepBatch(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(err.value.trailing_metadata())["seqserve-reason"] == reason
    for sid in ("w1", "w2"):  # nothing of either batch was applied
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetSession(pb.SessionRef(session_id=sid))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_every_call_refused_while_draining_says_draining(start_server, samples):
    """From the moment a drain begins until the server stops listening, a refusal carries the
    reason; GetSession, GetModel and health keep answering. After the drain the port is closed
    and a call fails in the transport: UNAVAILABLE with no reason, as the proto says."""
    app, port = await start_server()
    x = samples["x"][0][:1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        await stub.Step(step_request("dr", 0, x, start=True))
        queue: asyncio.Queue = asyncio.Queue()

        async def feed():
            while (item := await queue.get()) is not None:
                yield item

        open_stream = stub.Stream(feed())
        queue.put_nowait(step_request("dr", 1, x))
        assert (await open_stream.read()).next_position == 2
        # What App.stop does first (the rest would close the port at once on an idle server).
        app.refuse_new()
        assert await open_stream.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(await open_stream.trailing_metadata())["seqserve-reason"] == "draining"
        queue.put_nowait(None)

        batch = pb.StepBatchRequest(session_ids=["dr"], positions=[2], frames=to_matrix(x))
        calls = {
            "Step": lambda: stub.Step(step_request("dr", 2, x)),
            "StepBatch": lambda: stub.StepBatch(batch),
            "Predict": lambda: stub.Predict(
                pb.PredictRequest(sequences=[pb.Sequence(frames=to_matrix(x))])
            ),
            "OpenSession": lambda: stub.OpenSession(pb.OpenSessionRequest()),
            "ResetSession": lambda: stub.ResetSession(pb.SessionRef(session_id="dr")),
            "CloseSession": lambda: stub.CloseSession(pb.SessionRef(session_id="dr")),
        }
        for name, make in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await make()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name
            assert dict(err.value.trailing_metadata())["seqserve-reason"] == "draining", name
        for name in ("Stream", "StreamBatch"):
            call = getattr(stub, name)(iter([]))
            assert await call.code() == grpc.StatusCode.UNAVAILABLE, name
            assert dict(await call.trailing_metadata())["seqserve-reason"] == "draining", name
        assert (await stub.GetSession(pb.SessionRef(session_id="dr"))).position == 2
        assert (await stub.GetModel(pb.ModelRequest())).features > 0
        await app.stop()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Step(step_request("dr", 2, x), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "seqserve-reason" not in dict(err.value.trailing_metadata() or ())
