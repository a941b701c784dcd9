"""Engine.greedy_chain with one decode step queued ahead of the host (owned CUDA cache + device argmax), checked on
a fake device whose stream runs queued work only when the host waits for it: the laziest order CUDA allows. A
pinned buffer overwritten before its copy ran, a token read before its event, an argmax queued after the next
step overwrote the logits, or a page row not copied would change the tokens."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgellm.device_runners.kv_pages import PAGE, PagePool

VOCAB = 97
MAPPED: dict[int, np.ndarray] = {}  # FakeCuda.mapped's buffers by device address


class Stream:
    def __init__(self):
        self.ops: list = []

    def run_until(self, marker=None) -> None:
        while self.ops:
            op = self.ops.pop(0)
            op()
            if marker is not None and op is marker:
                return


class DevTensor:
    """A device tensor of the fake: TVM's copies (copyfrom / numpy) synchronize the stream first, as TVM's do."""

    def __init__(self, stream: Stream, array):
        self.stream, self.data = stream, np.array(array)

    def copyfrom(self, src) -> None:
        self.stream.run_until()
        self.data[...] = src.data if isinstance(src, DevTensor) else np.asarray(src).reshape(self.data.shape)

    def numpy(self):
        self.stream.run_until()
        return self.data.copy()


class FakeCuda:
    """CudaAsync's interface on the fake stream: every copy and event is queued; `wait` runs the stream up to it."""

    stream: Stream  # set by the test

    def __init__(self, index: int = 0):
        self.index = index

    @staticmethod
    def available() -> bool:
        return True

    def set_device(self) -> None:
        pass

    def pinned(self, shape, dtype):
        return np.zeros(shape, dtype)

    def mapped(self, shape, dtype):
        """Host memory the fake's kernels write by address (MAPPED)."""
        arr = np.zeros(shape, dtype)
        address = 0x1000 + 0x100 * len(MAPPED)
        MAPPED[address] = arr
        return arr, address

    def event(self):
        return SimpleNamespace(op=None)

    def to_device(self, dst, src):
        self.stream.ops.append(lambda: dst.data.__setitem__(..., src.reshape(dst.data.shape)))  # src read when run

    def on_device(self, dst, src, nbytes):
        assert nbytes == src.data.nbytes == dst.data.nbytes
        self.stream.ops.append(lambda: dst.data.__setitem__(..., src.data.reshape(dst.data.shape)))

    def to_host(self, dst, src):
        self.stream.ops.append(lambda: dst.__setitem__(..., src.data.reshape(dst.shape)))

    def record(self, ev):
        ev.op = lambda: None
        self.stream.ops.append(ev.op)

    def wait(self, ev):
        if ev.op in self.stream.ops:
            self.stream.run_until(ev.op)


def next_token(tok: int, pos: int, page: int) -> int:
    return (3 * tok + 5 * pos + 7 * page + 1) % VOCAB


def _engine(stream: Stream, monkeypatch, total: int = 8, max_pages: int = 4):
    """An Engine on the owned-cache path whose decode graph and argmax are queued on `stream`. The decode writes
    the same logits tensor every call (a replayed CUDA graph does)."""
    from edgellm.device_runners.engine import Engine, _DeviceTokens
    from edgellm.runtime import cuda_async

    FakeCuda.stream = stream
    monkeypatch.setattr(cuda_async, "CudaAsync", FakeCuda)
    eng = object.__new__(Engine)
    eng.owned_kv, eng.dev, eng.kv, eng.params = True, None, "pages", "params"
    eng._tvm = SimpleNamespace(tensor=lambda a, dev: DevTensor(stream, a))
    eng._pool, eng._max_pages, eng._aux, eng._fns = PagePool(total, max_pages), max_pages, {}, {}
    eng.context_window, eng.chunk, eng.batch_min, eng.has_batch_decode = max_pages * PAGE, 16, 2, False
    eng._lengths, eng._next_seq, eng._shapes = {}, 0, {}
    eng.total_pages, eng._last_tokens = total, _DeviceTokens()
    eng.vocab_size = VOCAB
    eng.device_info = SimpleNamespace(kind="cuda", index=0)
    eng.decode_ahead, eng._ahead, eng.eos_ids = True, None, set()
    logits = DevTensor(stream, np.zeros((1, 1, VOCAB), np.float32))
    eng.calls = 0

    def decode(ids, pages, pt, pos, params):
        assert pages == "pages" and params == "params" and ids.data.shape == (1, 1)
        eng.calls += 1

        def run():
            p = int(pos.data[0])
            t = next_token(int(ids.data[0, 0]), p, int(pt.data[0, p // PAGE]))
            logits.data[...] = 0
            logits.data[0, 0, t] = 1
        stream.ops.append(run)
        return logits

    def decode_greedy(ids, pages, pt, pos, sink, params):
        """The graph of models/llama.py decode_greedy: the token into ids and the host sink, the position + 1."""
        assert pages == "pages" and params == "params" and ids.data.shape == (1, 1) and sink.data.dtype == np.int64
        eng.calls += 1

        def run():
            p = int(pos.data[0])
            t = next_token(int(ids.data[0, 0]), p, int(pt.data[0, p // PAGE]))
            ids.data[0, 0] = t
            pos.data[0] = p + 1
            MAPPED[int(sink.data[0])][p & 1] = t
        stream.ops.append(run)
        return ids

    def prefill(ids, pages, pt, pos, params):
        return decode(DevTensor(stream, ids.data[:, -1:]), pages, pt, pos, params)

    def argmax(x):
        out = DevTensor(stream, np.zeros((1, 1), np.int32))
        stream.ops.append(lambda: out.data.__setitem__(..., np.argmax(x.data.reshape(1, -1), axis=1).reshape(1, 1)))
        return out

    eng.vm = {"decode": decode, "prefill": prefill, "decode_greedy": decode_greedy}
    eng.has_decode_greedy, eng.decode_in_graph = True, True
    eng._argmax = argmax
    return eng


def _expected(eng, seq: int, pos: int, token: int, n: int) -> list[int]:
    """The chain by the rule itself: position p feeds the token and reads the page the pool gave `seq` for it."""
    pages, out = eng._pool.pages(seq), []
    for p in range(pos, pos + n):
        token = next_token(token, p, pages[p // PAGE])
        out.append(token)
    return out


@pytest.mark.parametrize("mode", ["in_graph", "copies", "steps"])
def test_chain_gives_the_rules_tokens_on_a_lazy_stream(monkeypatch, mode):
    """40 steps across page boundaries (rows copied as pages are added), queued ahead (the graph advancing its own
    inputs, or copies between steps) or step by step: the tokens the rule gives, the cache holds the 40 fed tokens,
    and nothing is left queued. Then a second chain on another sequence and one more on the first (the device
    position and ids restarted from the host)."""
    stream = Stream()
    eng = _engine(stream, monkeypatch)
    eng.decode_ahead, eng.decode_in_graph = mode != "steps", mode == "in_graph"
    a = eng.add_sequence()
    eng.prefill(a, [1, 2, 3])
    got = list(eng.greedy_chain(a, 11, 40))
    assert (eng._ahead is not None) is (mode != "steps")  # which path ran
    assert got == _expected(eng, a, 3, 11, 40)
    assert eng.sequence_length(a) == 43 and not stream.ops
    b = eng.add_sequence()
    eng.prefill(b, [4])
    assert list(eng.greedy_chain(b, 2, 21)) == _expected(eng, b, 1, 2, 21)
    assert list(eng.greedy_chain(a, 5, 7)) == _expected(eng, a, 43, 5, 7) and not stream.ops
    calls = eng.calls
    if mode == "in_graph":  # every step is decode_greedy: neither decode nor the argmax function runs
        eng.vm["decode"], eng._fns = None, {}
        eng._argmax = lambda x: pytest.fail("argmax called")
        assert list(eng.greedy_chain(a, 6, 3)) == _expected(eng, a, 50, 6, 3) and eng.calls == calls + 3


def test_chain_ahead_closed_early_drains_and_counts_the_queued_step(monkeypatch):
    stream = Stream()
    eng = _engine(stream, monkeypatch)
    a = eng.add_sequence()
    eng.prefill(a, [5])
    chain = eng.greedy_chain(a, 9, 30)
    got = [next(chain) for _ in range(5)]
    assert eng.calls == 1 + 6  # the prefill, the five steps whose tokens were taken, one queued ahead
    chain.close()
    assert not stream.ops  # nothing left queued on the pinned buffers
    assert eng.sequence_length(a) == 1 + 6  # the queued step's token was fed
    assert got == _expected(eng, a, 1, 9, 5)
    # a new chain reuses the pinned slots and goes on from the cache's length; then another sequence meanwhile
    more = list(eng.greedy_chain(a, 4, 20))
    assert more == _expected(eng, a, 7, 4, 20)
    b = eng.add_sequence()
    eng.prefill(b, [5])
    assert list(eng.greedy_chain(b, 9, 17)) == _expected(eng, b, 1, 9, 17) and not stream.ops


def test_chain_refuses_more_steps_than_the_context_window(monkeypatch):
    from edgellm.device_runners.engine import PromptTooLongError

    eng = _engine(Stream(), monkeypatch, max_pages=2)  # a 32-token window
    a = eng.add_sequence()
    eng.prefill(a, [1] * 10)
    with pytest.raises(PromptTooLongError, match="10 tokens; 23 decode steps would make 33 .* window is 32"):
        next(eng.greedy_chain(a, 1, 23))
    assert len(list(eng.greedy_chain(a, 1, 22))) == 22 and eng.sequence_length(a) == 32


def test_chain_falls_back_to_steps_without_a_device_argmax(monkeypatch):
    stream = Stream()
    eng = _engine(stream, monkeypatch)
    eng.device_info = SimpleNamespace(kind="cuda", index=0)
    eng._argmax = None
    a = eng.add_sequence()
    eng.prefill(a, [1, 2, 3])
    assert eng._decode_ahead_state() is None
    assert list(eng.greedy_chain(a, 11, 10)) == _expected(eng, a, 3, 11, 10)


def test_generate_greedy_runs_one_chain_and_stops_where_it_should(monkeypatch):
    """generate_ids (greedy) takes its tokens after the first from one queued-ahead chain: max_new_tokens, EOS
    and the context window end it as the step-by-step loop did, the queue drained and the sequence gone."""
    from edgellm.device_runners.engine import FinishReason

    stream = Stream()
    eng = _engine(stream, monkeypatch, max_pages=2)  # a 32-token window
    from edgellm.device_runners.sampling import SamplingParams

    greedy = SamplingParams()
    prompt = [1, 2, 3]
    first = next_token(3, 0, 0)  # the fake prefill: its last token at the chunk's first position, page 0
    eng.decode_ahead = False
    full = list(eng.generate_ids(prompt, 12, greedy))
    assert eng.last_stats.finish_reason is FinishReason.LENGTH and len(full) == 12 and full[0] == first
    eng.decode_ahead = True
    assert list(eng.generate_ids(prompt, 12, greedy)) == full and eng._ahead is not None
    assert eng.pages_in_use() == 0 and not stream.ops
    eng.eos_ids = {full[4]}
    stop = list(eng.generate_ids(prompt, 12, greedy))
    assert stop == full[:full.index(full[4])] and eng.last_stats.finish_reason is FinishReason.STOP
    assert eng.pages_in_use() == 0 and not stream.ops
    eng.eos_ids = set()
    long = list(eng.generate_ids(prompt, 100, greedy))  # the window: 3 prompt tokens + 29 generated fit 32
    assert len(long) == 29 and long[:12] == full and eng.last_stats.finish_reason is FinishReason.CONTEXT


def test_chain_copies_between_steps_where_mapped_memory_fails(monkeypatch):
    """No mapped host memory (cudaHostAlloc / cudaHostGetDevicePointer refused): one warning, and the chains run
    decode + copies between steps with the same tokens."""
    from edgellm.runtime.cuda_async import CudaAsyncError

    def refuse(self, shape, dtype):
        raise CudaAsyncError("cudaHostGetDevicePointer failed: CUDA error 1 (invalid argument)")

    stream = Stream()
    eng = _engine(stream, monkeypatch)
    monkeypatch.setattr(FakeCuda, "mapped", refuse)
    eng.vm["decode_greedy"] = lambda *a: pytest.fail("decode_greedy called without its sink")
    a = eng.add_sequence()
    eng.prefill(a, [1, 2, 3])
    assert list(eng.greedy_chain(a, 11, 20)) == _expected(eng, a, 3, 11, 20)
    assert not eng.has_decode_greedy and "d_sink" not in eng._ahead[1] and not stream.ops
