"""Budgets per key: images per UTC day and USD per UTC day and month, held before a request is routed
(OpenAI's 429 insufficient_quota when it would pass one) and settled with what it really cost.

A request reserves its images and its estimated cost when it starts; two proxies sharing Redis see each
other's reservations at once, so a burst overshoots by no more than what was already in flight.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.usage import BudgetConfig
from ..errors import NO_RETRY, ProxyError

if TYPE_CHECKING:
    from ..state.shared_redis import RedisState


class QuotaExceeded(ProxyError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


@dataclass
class Hold:
    """What one request reserved (images and micro-USD) in its day's and month's counters."""

    key: str
    day: str
    month: str
    images: int
    micro_usd: int


_last: list = [0.0, 0.0, None]  # [day start, day end, periods]: one day's answer, kept (this runs per request)


def periods(now: float) -> tuple[str, str, float, float]:
    """(day, month, when the day ends, when the month ends) in UTC for a Unix time."""
    if _last[0] <= now < _last[1]:
        return _last[2]
    found = _periods(now)
    _last[:] = [found[2] - 86400, found[2], found]
    return found


def _periods(now: float) -> tuple[str, str, float, float]:
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    day_end = dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    month_end = dt.datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=dt.UTC)
    return t.strftime("%Y-%m-%d"), t.strftime("%Y-%m"), day_end.timestamp(), month_end.timestamp()


def month_start(now: float) -> float:
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    return dt.datetime(t.year, t.month, 1, tzinfo=dt.UTC).timestamp()


def _usd(amount: float | None) -> str:
    """Dollars as people write them: $20.00, $0.03; a budget of fractions of a cent keeps its digits."""
    amount = amount or 0.0
    return f"${amount:,.2f}" if round(amount, 2) == amount else f"${amount:,.6f}".rstrip("0")


def _limit(which: str, budget: BudgetConfig) -> str:
    return {"images_per_day": f"{budget.images_per_day} images per day",
            "usd_per_day": f"{_usd(budget.usd_per_day)} per day",
            "usd_per_month": f"{_usd(budget.usd_per_month)} per month"}[which]




def refusal(which: str, budget: BudgetConfig, resets_at: float, now: float) -> QuotaExceeded:
    """OpenAI's answer for a spent quota, saying which budget and when it resets."""
    when = dt.datetime.fromtimestamp(resets_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers = {"x-qip-budget-resets-at": str(int(resets_at)), **NO_RETRY}
    return QuotaExceeded(f"You exceeded your current quota: this API key's budget of {_limit(which, budget)} "
                         f"is spent (budget.{which}); it resets at {when}.", retry_after=max(1.0, resets_at - now),
                         headers=headers)


def beyond_budget(which: str, budget: BudgetConfig, images: int, micro_usd: int) -> QuotaExceeded:
    """The answer for a request that alone asks more than the whole budget: no wait makes it pass, so it
    says so, with no Retry-After (which would send the client back at the reset to be refused again)."""
    asked = f"{images} image{'s' if images != 1 else ''}" + (f", about {_usd(micro_usd / 1_000_000)}" if micro_usd else "")
    return QuotaExceeded(f"You exceeded your current quota: this request alone ({asked}) is more than this API "
                         f"key's whole budget of {_limit(which, budget)} (budget.{which}); ask for fewer or "
                         "smaller images.", headers=dict(NO_RETRY))


def limits_of(budget: BudgetConfig) -> tuple[int, int, int]:
    """(images per day, micro-USD per day, micro-USD per month); -1 for no limit."""
    def micro(usd: float | None) -> int:
        return -1 if usd is None else round(usd * 1_000_000)
    return (-1 if budget.images_per_day is None else budget.images_per_day,
            micro(budget.usd_per_day), micro(budget.usd_per_month))


def over(spent: tuple[int, int, int], want: tuple[int, int], limits: tuple[int, int, int]) -> str | None:
    """Which budget this request would pass (pure): spent = (images today, micro-USD today, this month),
    want = (images, micro-USD). A budget already spent refuses even a request of unknown cost."""
    images, usd_day, usd_month = spent
    n, usd = want
    if limits[0] >= 0 and images + n > limits[0]:
        return "images_per_day"
    if limits[1] >= 0 and (usd_day + usd > limits[1] or usd_day >= limits[1]):
        return "usd_per_day"
    if limits[2] >= 0 and (usd_month + usd > limits[2] or usd_month >= limits[2]):
        return "usd_per_month"
    return None


class MemorySpend:
    """The counters in this process (seeded from the ledger at start, so a restart forgets nothing)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}  # (key, period, what) -> count

    def _get(self, key: str, period: str, what: str) -> int:
        return self._counts.get((key, period, what), 0)

    def _add(self, key: str, period: str, what: str, amount: int) -> None:
        self._counts[(key, period, what)] = self._get(key, period, what) + amount

    async def reserve(self, hold: Hold, limits: tuple[int, int, int]) -> str | None:
        spent = (self._get(hold.key, hold.day, "img"), self._get(hold.key, hold.day, "usd"),
                 self._get(hold.key, hold.month, "usd"))
        which = over(spent, (hold.images, hold.micro_usd), limits)
        if which is None:
            await self.add(hold, hold.images, hold.micro_usd)
        return which

    async def floor(self, totals: dict[tuple[str, str, str], int]) -> None:
        """Raise counters ((key, period, "img" | "usd") -> count) to at least these (the ledger's sums)."""
        for counter, amount in totals.items():
            self._counts[counter] = max(self._counts.get(counter, 0), amount)

    async def add(self, hold: Hold, images: int, micro_usd: int) -> None:
        self._add(hold.key, hold.day, "img", images)
        self._add(hold.key, hold.day, "usd", micro_usd)
        self._add(hold.key, hold.month, "usd", micro_usd)


# Checks and reserves in one step (no other proxy between the read and the write).
_RESERVE = """
local img = tonumber(redis.call('GET', KEYS[1]) or '0')
local day = tonumber(redis.call('GET', KEYS[2]) or '0')
local month = tonumber(redis.call('GET', KEYS[3]) or '0')
local n, usd = tonumber(ARGV[1]), tonumber(ARGV[2])
local li, ld, lm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if li >= 0 and img + n > li then return 'images_per_day' end
if ld >= 0 and (day + usd > ld or day >= ld) then return 'usd_per_day' end
if lm >= 0 and (month + usd > lm or month >= lm) then return 'usd_per_month' end
redis.call('INCRBY', KEYS[1], n) redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('INCRBY', KEYS[2], usd) redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('INCRBY', KEYS[3], usd) redis.call('EXPIRE', KEYS[3], ARGV[7])
return ''
"""

_ADD = """
redis.call('INCRBY', KEYS[1], ARGV[1]) redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('INCRBY', KEYS[2], ARGV[2]) redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('INCRBY', KEYS[3], ARGV[2]) redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
"""

# Raises each counter to at least its ARGV value (ARGV[1] the day's TTL, ARGV[2] the month's; then a value
# and whether it is a month's, per key), never lowers one: several proxies may each do it at start-up.
_FLOOR = """
for i, key in ipairs(KEYS) do
  local want = tonumber(ARGV[1 + 2 * i])
  if tonumber(redis.call('GET', key) or '0') < want then
    redis.call('SET', key, want, 'EX', ARGV[2 + 2 * i] == '1' and ARGV[2] or ARGV[1])
  end
end
return 1
"""

_DAY_TTL, _MONTH_TTL = 2 * 86400, 32 * 86400


class RedisSpend:
    """The counters in Redis (state.redis_url): every proxy sharing it counts against the same budgets."""

    def __init__(self, state: RedisState) -> None:
        self.state = state

    def _key(self, key: str, period: str, what: str) -> str:
        # A key's counters share its hash tag on a cluster: one script reads and raises all three.
        return f"{self.state.prefix}budget:{self.state.tag(key)}:{period}:{what}"

    def _keys(self, hold: Hold) -> tuple[str, str, str]:
        return (self._key(hold.key, hold.day, "img"), self._key(hold.key, hold.day, "usd"),
                self._key(hold.key, hold.month, "usd"))

    async def reserve(self, hold: Hold, limits: tuple[int, int, int]) -> str | None:
        which = await self.state.call(self.state.client.eval(
            _RESERVE, 3, *self._keys(hold), hold.images, hold.micro_usd, *limits, _DAY_TTL, _MONTH_TTL))
        which = which.decode() if isinstance(which, bytes) else which
        return which or None

    async def floor(self, totals: dict[tuple[str, str, str], int]) -> None:
        """Raise counters ((key, period, "img" | "usd") -> count) to at least the ledger's sums: spending
        made before a key had a budget counts too (a month's period is "YYYY-MM", a day's "YYYY-MM-DD")."""
        if not totals:
            return
        # One script per API key (its counters share a slot on a cluster), all in one round trip.
        by_key: dict[str, list[tuple[str, str, int]]] = {}
        for (key, period, what), amount in totals.items():
            by_key.setdefault(key, []).append((period, what, amount))
        pipe = self.state.client.pipeline(transaction=False)
        for key, counters in by_key.items():
            keys = [self._key(key, period, what) for period, what, _ in counters]
            args = [a for period, _, amount in counters for a in (amount, int(len(period) == 7))]
            pipe.eval(_FLOOR, len(keys), *keys, _DAY_TTL, _MONTH_TTL, *args)
        await self.state.call(pipe.execute())

    async def add(self, hold: Hold, images: int, micro_usd: int) -> None:
        await self.state.call(self.state.client.eval(
            _ADD, 3, *self._keys(hold), images, micro_usd, _DAY_TTL, _MONTH_TTL))
