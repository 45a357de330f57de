"""The profiler's trust checks, its cache, the first-profile notice and ``profile --check``.

Timings come from a fake clock that the fake backend advances by a synthetic cost per call
(``TimedFake``), so every check can be made to fire, or not, deterministically; nothing here
measures the real machine.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest
from fake_backend import FakeBackend

from knapspec.backends import profiling
from knapspec.backends.base import Backend
from knapspec.backends.profile_check import CheckPoint, ProfileCheck, check_profile
from knapspec.backends.profile_trust import (
    CpuSample,
    TrustPolicy,
    UntrustedProfileError,
    assess,
    jump_flags,
    other_cpus,
    proc_stat_busy,
    spread_flags,
)
from knapspec.backends.profiling import cached_profile, profile_backend
from knapspec.costmodels.io import load_cost_model
from knapspec.errors import KnapSpecError

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="the CLI builds planners, which need numba")

CONTEXTS = [256, 1024, 2048, 4096, 6144]
NS = [1, 2, 4]


class Clock:
    """A fake ``perf_counter``: seconds advanced only by the fake backend."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TimedFake(FakeBackend):
    """``FakeBackend`` whose calls take synthetic time on a fake clock (seconds per call):
    attention block ``5e-5 n + 2e-7 c``, MLP block ``1e-4 n``, ``3e-4`` the rest, all
    times ``speed``; ``spike(c, n, mask)`` multiplies a call (other work stealing the CPU).
    ``other`` is the CPUs' worth of other work the fake ``cpu_sample`` reports."""

    def __init__(self, spike=None, other: float = 0.0, speed: float = 1.0) -> None:
        super().__init__(vocab=16, n_layers=4, max_context=8192)
        self.clock = Clock()
        self.spike = spike or (lambda c, n, mask: 1.0)
        self.other, self.speed = other, speed
        self.busy = 0.0  # CPU-seconds of the whole machine (ours + others)

    def forward(self, tokens, mask=None, *, capture=False, all_logits=True):
        c, n = self.length, len(tokens)
        out = super().forward(tokens, mask, capture=capture, all_logits=all_logits)
        skip = np.zeros(2 * self.layout.n_layers, bool) if mask is None else np.asarray(mask)
        attn = (~skip[0::2]).sum() * (5e-5 * n + 2e-7 * c)
        mlp = (~skip[1::2]).sum() * 1e-4 * n
        dt = (attn + mlp + 3e-4) * self.speed * self.spike(c, n, mask)
        self.clock.t += dt
        self.busy += dt * (1.0 + self.other)
        return out

    def cpu_sample(self) -> CpuSample:
        return CpuSample(self.clock.t, self.busy, self.clock.t, None)

    def profile(self, **kwargs):
        given = {k: v for k, v in kwargs.items() if v is not None}
        kwargs = {"contexts": CONTEXTS, "token_counts": NS, "repeats": 3, **given,
                  "progress": False}
        return profile_backend(self, clock=self.clock, cpu_sample=self.cpu_sample,
                               settle_seconds=0.0, **kwargs)


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch):
    """The machine has 2 CPUs, whatever runs the tests (the fakes use 1 thread)."""
    monkeypatch.setattr(profiling, "usable_cpus", lambda: 2)


def spike_at(context: int, factor: float = 40.0, calls: float = float("inf")):
    """A spike of ``factor`` on the first ``calls`` timed calls at ``context`` tokens."""
    left = [calls]

    def spike(c, n, mask):
        if c == context and left[0] > 0:
            left[0] -= 1
            return factor
        return 1.0

    return spike


# ---------------------------------------------------------------------- pure checks


def grid(value, repeats: int = 5) -> dict[str, np.ndarray]:
    """Samples ``[C, N, R]`` for two masks from ``value(c, n, mask)`` seconds."""
    return {m: np.array([[[value(c, n, m)] * repeats for n in NS] for c in CONTEXTS])
            for m in ("full", "none")}


def clean(c, n, m):
    return (1e-3 + 1e-6 * c) * n if m == "full" else 5e-4 * n


def test_a_clean_profile_passes_every_check():
    report = assess(grid(clean), CONTEXTS, NS, [0.1] * 5, threads=1, cpu_count=2)
    assert report.trusted and report.reasons == [] and not report.suspects
    assert report.evidence["other_cpus_during"] == [0.1] * 5
    assert report.evidence["max_jump"] == 0.0 and report.evidence["max_rel_spread"] == 0.0


def test_a_point_forty_times_its_neighbours_is_flagged():
    # the incident: attention at 6,144 tokens measured 40x what 4,096 implied
    def poisoned(c, n, m):
        return clean(c, n, m) * (40 if c == 4096 and m == "full" else 1)

    flags = jump_flags({k: v[..., 0] for k, v in grid(poisoned, 1).items()}, CONTEXTS,
                       TrustPolicy())
    assert set(flags) == {(3, j, "full") for j in range(3)}
    assert all(r > 20 for r in flags.values())
    report = assess(grid(poisoned), CONTEXTS, NS, [0.0] * 5, threads=1, cpu_count=2)
    assert not report.trusted and "'full' at context 4096" in report.summary()


@pytest.mark.parametrize("context_index", [0, 4])
def test_jumps_at_either_end_are_flagged(context_index):
    def poisoned(c, n, m):
        return clean(c, n, m) * (3 if c == CONTEXTS[context_index] else 1)

    medians = {k: v[..., 0] for k, v in grid(poisoned, 1).items()}
    flags = jump_flags(medians, CONTEXTS, TrustPolicy())
    assert {i for i, _, _ in flags} == {context_index}


def test_linear_growth_and_small_noise_are_not_jumps():
    rng = np.random.default_rng(0)

    def noisy(c, n, m):
        return clean(c, n, m) * rng.uniform(0.9, 1.1)

    assert jump_flags({k: v[..., 0] for k, v in grid(noisy, 1).items()}, CONTEXTS,
                      TrustPolicy()) == {}


def test_scattered_repeats_are_flagged_but_one_outlier_is_not():
    samples = grid(clean)
    samples["full"][2, 1] = [2e-3, 6e-3, 2e-3, 9e-3, 5e-3]  # the repeats disagree
    samples["full"][1, 0] = [2e-3, 2e-3, 2e-3, 2e-3, 9e-3]  # one interrupted call: fine
    flags = spread_flags(samples, TrustPolicy())
    assert list(flags) == [(2, 1, "full")]
    report = assess(samples, CONTEXTS, NS, [None] * 5, threads=1, cpu_count=2)
    assert not report.trusted and "scattered repeats" in report.summary()
    assert "'full' at context 2048, 2 tokens" in report.summary()


def test_tiny_jitter_below_the_absolute_floor_is_not_spread():
    samples = grid(clean)
    samples["none"][0, 0] = [5e-6, 2e-5, 5e-6, 2e-5, 1e-5]  # 100% spread, but microseconds
    assert spread_flags(samples, TrustPolicy()) == {}


def test_other_work_during_a_row_is_flagged_against_the_free_cpus():
    # 2 threads on 2 CPUs: half a CPU of other work is tolerated
    report = assess(grid(clean), CONTEXTS, NS, [0.0, 0.4, 1.3, 0.0, None], threads=2,
                    cpu_count=2)
    assert not report.trusted and report.loaded_rows == {2}
    assert "other work used 1.3 CPUs while context 2048" in report.summary()
    assert "limit 0.5: 2 threads on 2 CPUs" in report.summary()
    # the same load on a machine with CPUs to spare is harmless
    assert assess(grid(clean), CONTEXTS, NS, [1.3] * 5, threads=2, cpu_count=8).trusted


def test_other_cpus_from_proc_stat_or_the_load_average():
    a = CpuSample(wall=10.0, busy=100.0, own=5.0, loadavg=3.0)
    b = CpuSample(wall=12.0, busy=104.0, own=7.0, loadavg=3.5)
    assert other_cpus(a, b, threads=1) == pytest.approx(1.0)  # (4 - 2) CPU-s over 2 s
    no_stat = CpuSample(12.0, None, 7.0, 3.5)
    assert other_cpus(a, no_stat, threads=2) == pytest.approx(1.5)
    assert other_cpus(a, CpuSample(12.0, None, 7.0, None), threads=2) is None


def test_proc_stat_busy_counts_only_the_cpus_this_process_may_use():
    text = ("cpu  400 0 100 1000 50 0 0 0 0 0\n"
            "cpu0 100 0 50 500 25 0 0 0 0 0\n"
            "cpu1 300 0 50 500 25 0 0 0 0 0\n"
            "intr 12345\n\n")
    assert proc_stat_busy(text, None, hz=100.0) == pytest.approx(5.0)  # idle, iowait out
    assert proc_stat_busy(text, {0}, hz=100.0) == pytest.approx(1.5)  # busy elsewhere: ignored
    assert proc_stat_busy("intr 1\n", {0}, hz=100.0) is None


def test_bad_thresholds_are_refused():
    with pytest.raises(KnapSpecError, match="invalid trust thresholds"):
        TrustPolicy(max_jump=0.5)


# ---------------------------------------------------------------------- the profiler


def test_a_transient_spike_is_measured_again_and_the_profile_trusted():
    be = TimedFake(spike=spike_at(6144, calls=48))  # one pass over the 6144-token row
    model = be.profile()
    trust = model.meta["trust"]
    assert trust["trusted"] and trust["retries"] == 1 and trust["remeasured_points"] > 0
    assert model.attention(6144) == pytest.approx(5e-5 + 2e-7 * 6144)


def test_a_persistent_spike_leaves_the_profile_untrusted_with_its_evidence():
    model = TimedFake(spike=spike_at(6144)).profile()
    trust = model.meta["trust"]
    assert trust["trusted"] is False and trust["retries"] == TrustPolicy().max_retries
    assert "context 6144" in trust["reasons"][0] and trust["max_jump"] > 20
    for key in ("other_cpus_before", "loadavg_before", "other_cpus_during", "thresholds",
                "max_rel_spread", "threads", "cpu_count"):
        assert key in trust
    json.dumps(model.meta)  # the evidence is stored in the profile JSON


def test_other_work_during_profiling_makes_it_untrusted():
    model = TimedFake(other=2.0).profile()  # 1 thread on 2 CPUs: 1.5 CPUs may be busy
    trust = model.meta["trust"]
    assert trust["trusted"] is False and "other work used 2.0 CPUs" in trust["reasons"][0]
    assert trust["other_cpus_during"] == pytest.approx([2.0] * len(CONTEXTS))
    assert trust["retries"] == TrustPolicy().max_retries  # measured again, still loaded
    assert TimedFake(other=0.3).profile().meta["trust"]["trusted"]


def test_an_untrusted_profile_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "cm.json"
    with pytest.raises(UntrustedProfileError) as err:
        cached_profile(TimedFake(spike=spike_at(6144)), path=out)
    message = str(err.value)
    assert "\n" not in message and "context 6144" in message and "--force" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_allow_untrusted_saves_it_marked_and_later_loads_warn(tmp_path, caplog):
    out = tmp_path / "cm.json"
    cached_profile(TimedFake(spike=spike_at(6144)), path=out, allow_untrusted=True)
    assert json.loads(out.read_text())["meta"]["trust"]["trusted"] is False
    with caplog.at_level(logging.WARNING, logger="knapspec.backends.profiling"):
        model = cached_profile(TimedFake(), path=out)
    assert model.meta["trust"]["trusted"] is False
    assert "marked untrusted" in caplog.text


def test_first_profile_says_once_what_it_does_and_where_it_caches(tmp_path, caplog):
    out = tmp_path / "cm.json"
    said: list[str] = []
    with caplog.at_level(logging.INFO, logger="knapspec.backends.profiling"):
        cached_profile(TimedFake(), path=out, notice=said.append)
        cached_profile(TimedFake(), path=out, notice=said.append)  # cached: nothing said
    assert len(said) == 1
    assert "once per model, backend and thread count" in said[0]
    assert str(out) in said[0] and "minute" in said[0]
    assert caplog.text.count("once per model") == 1
    assert out.exists()


def test_default_cache_path_keeps_its_key(monkeypatch, tmp_path):
    monkeypatch.setenv("KNAPSPEC_CACHE_DIR", str(tmp_path))

    class Described(TimedFake):
        def describe(self):
            return {"backend": "llamacpp", "model_key": "ab/cd", "dtype": "gguf", "threads": 2}

    assert profiling.default_profile_path(Described()) == (
        tmp_path / "costmodels" / "llamacpp-ab_cd-gguf-2.json")


def test_cache_key_changes_with_device_and_dtype(monkeypatch, tmp_path):
    """Off the CPU the device name joins the key; dtype was in it already; a CPU profile
    keeps the key it had before devices existed."""
    monkeypatch.setenv("KNAPSPEC_CACHE_DIR", str(tmp_path))

    def described(**d):
        class Described(TimedFake):
            def describe(self):
                return {"backend": "torch", "model_key": "random:qwen2.5-1.5b",
                        "dtype": "bfloat16", "threads": 16, **d}
        return profiling.default_profile_path(Described()).name

    cpu = described(device="cpu", device_name="AMD EPYC 9654")
    assert cpu == described() == "torch-random:qwen2.5-1.5b-bfloat16-16.json"
    h200 = described(device="cuda:0", device_name="NVIDIA H200")
    assert h200 == "torch-random:qwen2.5-1.5b-bfloat16-16-NVIDIA_H200.json"
    assert described(device="cuda:1", device_name="NVIDIA H200") == h200  # same kind of GPU
    assert described(device="cuda:0", device_name="NVIDIA H100 80GB HBM3") != h200
    assert described(device="cuda:0") == "torch-random:qwen2.5-1.5b-bfloat16-16-cuda_0.json"
    assert described(device="cuda:0", device_name="NVIDIA H200", dtype="float16") != h200


# ---------------------------------------------------------------------- device timers


class FakeCuda:
    """A stand-in for ``torch.cuda``: events stamp a fake clock; every call is logged."""

    def __init__(self, clock) -> None:
        self.clock, self.log = clock, []

    def Event(self, enable_timing: bool = False):  # torch.cuda's name
        assert enable_timing
        return FakeEvent(self)

    def current_stream(self, device):
        self.log.append(("stream", str(device)))
        return "stream"

    def synchronize(self, device=None) -> None:
        self.log.append(("sync", str(device)))


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.t = cuda, None

    def record(self, stream=None) -> None:
        self.t = self.cuda.clock()
        self.cuda.log.append(("record", stream))

    def synchronize(self) -> None:
        self.cuda.log.append(("wait",))

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1e3  # milliseconds, as torch reports


class OnCuda(TimedFake):
    """``TimedFake`` that says it runs on a GPU."""

    def describe(self):
        return {"backend": "fake", "device": "cuda:0", "device_name": "NVIDIA H200",
                "threads": 16}


def test_timer_follows_the_backends_device():
    pytest.importorskip("torch", reason="a CUDA timer refers to torch.cuda")
    from knapspec.backends import timing

    assert timing.timer_for(TimedFake()).kind == "perf_counter"  # no device: the CPU
    cuda = timing.timer_for(OnCuda())
    assert isinstance(cuda, timing.CudaTimer) and cuda.device == "cuda:0"
    assert timing.timer_for(OnCuda(), clock=lambda: 0.0).kind == "clock"  # tests' clocks win
    grid = profiling.TimingGrid(OnCuda(), [256], [1], {"full": None}, 1)
    assert grid.timer.kind == "cuda-events"
    # on a GPU other work is judged against the one host thread that launches kernels
    assert grid.threads == 1 and profiling.backend_threads(OnCuda()) == 16


def test_cuda_timer_synchronizes_first_and_times_between_events():
    from knapspec.backends.timing import CudaTimer, median_seconds

    clock = Clock()
    fake = FakeCuda(clock)
    timer = CudaTimer("cuda:1", cuda=fake)

    def work():
        fake.log.append(("work",))
        clock.t += 0.004

    assert timer.time(work) == pytest.approx(0.004)
    assert fake.log == [("stream", "cuda:1"), ("sync", "cuda:1"), ("record", "stream"),
                        ("work",), ("record", "stream"), ("wait",)]
    fake.log.clear()
    assert median_seconds(timer, work, repeats=3, warmup=2) == pytest.approx(0.004)
    assert fake.log.count(("work",)) == 5 and fake.log.count(("sync", "cuda:1")) == 3
    with pytest.raises(KnapSpecError, match="repeats"):
        median_seconds(timer, work, repeats=0)


def test_a_profile_on_a_gpu_is_timed_with_cuda_events(monkeypatch):
    """Every profiled and checked call on a CUDA backend goes through the event timer, and
    gives the profile a host clock would give where the host clock is true."""
    from knapspec.backends import timing

    be = OnCuda()
    fake = FakeCuda(be.clock)
    real = timing.CudaTimer
    monkeypatch.setattr(timing, "CudaTimer", lambda device: real(device, fake))
    model = profile_backend(be, contexts=CONTEXTS, token_counts=NS, repeats=3,
                            progress=False, cpu_sample=be.cpu_sample, settle_seconds=0.0)
    timed = len(CONTEXTS) * len(NS) * 4 * 3  # points x masks x repeats
    assert fake.log.count(("sync", "cuda:0")) == timed
    assert fake.log.count(("record", "stream")) == 2 * timed
    assert model.meta["timer"] == "cuda-events" and model.meta["device"] == "cuda:0"
    reference = TimedFake().profile()
    assert reference.meta["timer"] == "clock"
    for c in CONTEXTS:
        assert model.attention(c, 2) == pytest.approx(reference.attention(c, 2))
    assert model.mlp(4) == pytest.approx(reference.mlp(4))
    fake.log.clear()
    check_profile(be, model, cpu_sample=be.cpu_sample)
    assert fake.log.count(("sync", "cuda:0")) == 2 * 2 * 3 * 3  # contexts x ns x masks x R


def test_profiling_does_not_import_the_backend_at_run_time():
    # Backend.profile calls the profiler; the profiler refers to Backend only for typing
    assert "Backend" not in vars(profiling)
    assert Backend.profile.__module__ == "knapspec.backends.base"


# ---------------------------------------------------------------------- --check


def test_check_profile_ratios_against_a_fresh_measurement():
    be = TimedFake()
    model = be.profile()
    same = check_profile(be, model, clock=be.clock, cpu_sample=be.cpu_sample)
    assert same.ok and same.overall == pytest.approx(1.0)
    names = [p.name for p in same.points]
    assert names == ["step, 1 token @ 1024", "attention block @ 1024",
                     "attention block @ 4096", "mlp block", "verify 4 tokens @ 1024"]
    slow = TimedFake(speed=2.0)
    off = check_profile(slow, model, clock=slow.clock, cpu_sample=slow.cpu_sample)
    assert not off.ok and off.overall == pytest.approx(2.0)
    assert "off" in off.table() and "overall" in off.table()


def test_check_table_and_tolerance():
    check = ProfileCheck([CheckPoint("a", 1e-3, 1.4e-3), CheckPoint("b", 1e-3, 0.6e-3)], 1.5)
    assert check.off(check.points[1]) and not check.off(check.points[0]) and not check.ok
    assert check.overall == pytest.approx((1.4 * 0.6) ** 0.5)
    with pytest.raises(KnapSpecError, match="table"):
        check_profile(TimedFake(), object())


@needs_numba
def test_cli_profile_check_reports_and_fails_when_off(monkeypatch, tmp_path, capsys):
    import knapspec.runtime as runtime
    from knapspec.backends import profile_check
    from knapspec.cli import main

    fake = {"speed": 1.0}
    check = profile_check.check_profile

    def build(config):
        be = TimedFake(speed=fake["speed"])
        # --check times with the fake backend's clock too
        monkeypatch.setattr(profile_check, "check_profile", lambda backend, model, **kw:
                            check(backend, model, clock=be.clock, cpu_sample=be.cpu_sample,
                                  **kw))
        return be

    monkeypatch.setattr(runtime, "build_backend", build)
    out = tmp_path / "cm.json"
    assert main(["profile", "--out", str(out), "--repeats", "3"]) == 0
    captured = capsys.readouterr()
    assert "once per model, backend and thread count" in captured.err
    assert load_cost_model(out).meta["trust"]["trusted"]
    assert main(["profile", "--check", "--out", str(out)]) == 0
    assert "within 1.5x" in capsys.readouterr().out
    fake["speed"] = 3.0
    assert main(["profile", "--check", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "overall" in captured.out and "3.00x" in captured.out
    assert "off by more than 1.5x" in captured.err
    assert main(["profile", "--check", "--out", str(tmp_path / "none.json")]) == 2
    assert "no profile to check" in capsys.readouterr().err


@needs_numba
def test_cli_refuses_an_untrusted_profile_in_one_line(monkeypatch, tmp_path, capsys):
    import knapspec.runtime as runtime
    from knapspec.cli import main

    monkeypatch.setattr(runtime, "build_backend",
                        lambda config: TimedFake(spike=spike_at(6144)))
    out = tmp_path / "cm.json"
    assert main(["profile", "--out", str(out), "--contexts", "256,1024,2048,4096,6144"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("knapspec: error: profile not cached") and not out.exists()
    assert main(["profile", "--out", str(out), "--contexts", "256,1024,2048,4096,6144",
                 "--force"]) == 0
    assert "UNTRUSTED" in capsys.readouterr().out and out.exists()


@needs_numba
def test_cli_generate_says_before_a_first_profile(monkeypatch, tmp_path, capsys):
    import knapspec.runtime as runtime
    from knapspec.cli import main

    monkeypatch.setenv("KNAPSPEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "build_backend", lambda config: TimedFake())
    assert main(["generate", "hi", "--strategy", "ar", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("once per model, backend and thread count") == 1
    assert str(tmp_path / "costmodels") in err
    assert main(["generate", "hi", "--strategy", "ar", "--max-new-tokens", "4"]) == 0
    assert "once per model" not in capsys.readouterr().err  # cached now
