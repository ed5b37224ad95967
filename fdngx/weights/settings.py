"""The policy's settings (PolicyConfig) and the defaults each flavor needs. Pure."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fdngx.domain import Flavor
from fdngx.errors import UsageError, check_number
from fdngx.weights.state import PolicyState

# Seconds an option of the sidecar's loop may say at most (its interval, hold, ramp, grace, debounce): an hour.
# Longer is a typo, and each ends in a timer or a wait: past threading.TIMEOUT_MAX (~9.2e9 s) an OverflowError.
MAX_SECONDS = 3600.0
MAX_WEIGHT = 10_000  # the bound of the inventory's static weights and of what render writes (--scale)
MAX_COUNT = 10_000  # consecutive checks, reloads per minute (openresty's "no budget" is 10,000)


@dataclass(frozen=True)
class PolicyConfig:
    interval: float = 2.0  # seconds between cycles (the sidecar's; cron mode uses its own period)
    alpha: float = 0.3  # EWMA weight of a new sample
    # How far each cycle moves the correction toward the load model's estimate (1: all the way; 0: no load
    # correction at all, as in the openresty flavor, whose balancer sees the scraped load itself).
    gain: float = 0.5
    tolerance: float = 0.05  # |log correction| within this counts as balanced: noise moves nothing
    soft: float = 0.05  # requests per slot every replica is owed in the load model: idle noise moves nothing
    min_factor: float = 0.1  # bounds on the correction g
    max_factor: float = 2.0
    kv_threshold: float = 0.85  # KV usage above this counts as extra load
    kv_gain: float = 1.0  # KV 100% adds one full set of slots to the load
    deadband_rel: float = 0.2  # ignore weight moves smaller than 20% of the current weight...
    deadband_abs: int = 2  # ...or smaller than this many units
    min_hold: float = 10.0  # seconds a weight stays before it may move again
    max_reloads_per_minute: int = 4
    fail_threshold: int = 3  # consecutive failed /health before `down`
    # ...but a replica whose /health is refused (nothing listens) stays in the config this long: nginx's own
    # passive check (max_fails/fail_timeout) retries its requests elsewhere at once and brings it back as
    # soon as it listens again, with no reload (each reload blinds least_conn for about a stream's length).
    refused_grace: float = 30.0
    recover_threshold: int = 2  # consecutive /health 200 before back up
    # Seconds from recovery to full weight; 0 (default): full weight at once, as a fleet that needs the
    # replica wants (measured: a ramp under the reload budget kept a restarted replica idle for 25-30 s).
    ramp_duration: float = 0.0
    ramp_steps: int = 4
    # The ramp protects a cold replica while the others have room; once they queue (fleet load per slot at
    # or above this), every request held back from the returning replica waits in a queue elsewhere, so the
    # ramp ends at once.
    ramp_until_load: float = 1.0
    stale_after: float = 10.0  # metrics older than this no longer steer the weight
    stale_half_life: float = 10.0  # how fast a stale correction fades back to neutral
    # A replica's decode speed (TPOT against the fleet's median) scales its weight. Off for the nginx
    # flavor (see config_for_flavor), on for openresty.
    speed_aware: bool = False
    speed_tolerance: float = 0.2  # |log speed ratio| beyond this moves the weight (about 18 % slower)
    speed_min_tokens: float = 8  # TPOT observations needed for one speed update
    min_speed: float = 0.25  # bounds on the speed factor
    # Never above 1: a replica running fewer requests decodes each faster (a smaller batch), so a low TPOT
    # says as much about its load as about its hardware. Measured: with a half-slots replica (legacy metrics),
    # a factor of 1.3 from its small batches raised its weight past its slots, and its queue set the p99
    # (1.9x the oracle). Only a replica slower than the fleet is scaled down.
    max_speed: float = 1.0
    scale: int = 20  # weight of the biggest replica at neutral load
    max_weight: int = 100

    def validated(self) -> PolicyConfig:
        for name, (option, low, high, unit) in BOUNDS.items():
            check_number(option or f"policy setting {name}", getattr(self, name), low, high, unit)
        if self.scale > self.max_weight:
            raise UsageError(f"--scale {self.scale}: want at most the policy's max_weight, {self.max_weight}")
        checks = [
            (0 < self.alpha <= 1, "alpha must be in (0, 1]"),
            (0 <= self.gain <= 1, "gain must be in [0, 1]"),
            (0 < self.min_factor <= 1 <= self.max_factor, "min_factor <= 1 <= max_factor, both > 0"),
            (self.speed_tolerance >= 0, "speed tolerance must be >= 0"),
            (0 < self.min_speed <= 1 <= self.max_speed, "min_speed <= 1 <= max_speed, both > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(f"policy: {msg}")
        return self


# The numeric settings `fdngx sidecar` takes from its command line, each with its option (None: no option sets
# it) and its range. NaN and the infinities are in no range: a NaN compares false with everything, so a check
# such as `interval <= 0` let it through and the loop ran with it.
BOUNDS: dict[str, tuple[str | None, float, float, str]] = {
    "interval": ("--interval", 0.05, MAX_SECONDS, "seconds"),
    "min_hold": ("--min-hold", 0.0, MAX_SECONDS, "seconds"),
    "refused_grace": ("--refused-grace", 0.0, MAX_SECONDS, "seconds"),
    "ramp_duration": ("--ramp", 0.0, MAX_SECONDS, "seconds"),
    "stale_after": ("--stale-after", 0.05, MAX_SECONDS, "seconds"),
    "stale_half_life": (None, 0.05, MAX_SECONDS, "seconds"),
    "scale": ("--scale", 1, MAX_WEIGHT, ""),
    "max_weight": (None, 1, MAX_WEIGHT, ""),
    "max_reloads_per_minute": ("--max-reloads-per-minute", 1, MAX_COUNT, ""),
    "fail_threshold": ("--fail-threshold", 1, MAX_COUNT, ""),
    "recover_threshold": ("--recover-threshold", 1, MAX_COUNT, ""),
    "ramp_steps": (None, 1, 1_000, ""),
}


def config_of_state(state: PolicyState) -> PolicyConfig:
    """The settings of the sidecar or cron job that wrote `state` (defaults for what it does not say)."""
    known = {f.name for f in fields(PolicyConfig)}
    try:
        return PolicyConfig(**{k: v for k, v in state.config.items() if k in known}).validated()
    except (TypeError, UsageError):
        return PolicyConfig()


def config_for_flavor(flavor: Flavor | str, **settings: Any) -> PolicyConfig:
    """The policy as each flavor needs it.

    openresty: the Lua balancer sees live in-flight plus the scraped load itself, so the weight carries only
    capacity, health, speed and ramp (a load correction would count the load twice), and since a change costs
    no reload there is no dead-band, hold or reload budget to pay for.

    Speed: measured with one half-speed replica of four (bench/lb, 3 windows each, two runs), scaling its
    weight by its speed cut p99 end-to-end latency by 13-27 % with p99 TTFT within noise through the Lua
    balancer, which also sees the fast replicas' queues and fills the slow one's free slots before any request
    queues (side by side since that rule: p99 E2E 0.90-0.92x, pooled p99 TTFT 0.89-0.93x, undecided);
    through nginx's weighted least_conn it cut p99 E2E by 18-27 % but raised p99 TTFT 1.7-2.2x (the fast
    replicas' slots fill first). So it is on by default for openresty only; `speed_aware` overrides.
    """
    if settings.get("speed_aware") is None:
        settings["speed_aware"] = Flavor(flavor) is Flavor.OPENRESTY
    PolicyConfig(**settings).validated()  # what was asked, even where the flavor overrides it (--min-hold nan)
    if Flavor(flavor) is Flavor.OPENRESTY:
        settings.update(gain=0.0, deadband_rel=0.0, deadband_abs=0, min_hold=0.0, max_reloads_per_minute=10_000)
    return PolicyConfig(**settings).validated()
