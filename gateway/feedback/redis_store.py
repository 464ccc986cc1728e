"""The feedback store in Redis, shared by every gateway instance when scaled out.

Same semantics as `gateway.feedback.sqlite_store.SQLiteStore` (the store contract tests run against
both). Each batch is one Lua script, run with EVALSHA: Redis runs a script atomically, so
instances judging and counting events at once never interleave their read-modify-writes. The
script mirrors `gateway.feedback.impressions.credit_for` and
`gateway.feedback.attribution.pair_outcome`.

Key layout, under `prefix` (default ``fusion-gateway:feedback:``)::

    s:<request_id>       string: [time in ms, the impression's record] (the record as in
                         `gateway.feedback.impressions`: compact JSON, no user); expires at
                         the retention
    imp:<request_id>     hash, made by the impression's first event: pos (positive events so
                         far), t:<team> (credited clicks), e:<event_id> (seen, for
                         duplicates); expires with its record
    stored               hash: impressions saved, by time bucket (ms of its start, a
                         thousandth of the retention wide), for the live count
    rec:impressions, rec:clicks, rec:credit                  hashes by recommender
    pair:wins, pair:losses, pair:ties                        hashes by "a<US>b", a < b
    arm:impressions, arm:clicked_impressions, arm:clicks     hashes by arm
    events               hash: accepted events by kind
    weights              hash: version, json (LearnedWeights; highest version kept)

An impression costs one string key, and a small hash only once it has an event; their TTLs are
what deletes them, so nothing else names them and nothing is left to clean. (The first layout
kept each in a hash, `imp:<request_id>` with its record in the field `json`, too long for
Redis' compact hash encoding, and in a sorted set `index` for `expire` and the count; both are
still read, counted and drained, so a store written before keeps working.)

Liveness is judged by the injected clock as in SQLite (`now - at < retention_s`); the TTL
deletes the key once that is past. Scripts name keys they compute, so this is for a single
Redis server (with replicas), not Redis Cluster.

A connection that drops (Redis restarted, a proxy's idle timeout) is replaced and the command
sent again, twice at most, after 50-500 ms with jitter; a timeout is not retried, so an
operation still ends within the store's timeout and a few backoffs. Sending a script again
after its reply was lost cannot count twice what the gateway sends: an impression is saved
only if its key is new, and every event the gateway records has an id (the client's, or
`implicit:<kind>:<item>`), accepted once.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from gateway.feedback.attribution import PairCounts
from gateway.feedback.impressions import FeedbackEvent, StorableImpression
from gateway.feedback.records import (
    ArmCounts,
    EventResult,
    FeedbackStats,
    LearnedWeights,
    RecommenderCounts,
    store_errors,
)

__all__ = ["DEFAULT_PREFIX", "RedisStore"]

DEFAULT_PREFIX = "fusion-gateway:feedback:"
# Separates a and b in the pair hashes' fields: the ASCII unit separator, never in a name.
_US = "\x1f"
# A thousand buckets over the retention for the live count, as in the SQLite store.
_BUCKETS = 1000
# A dropped connection: sent again at most this often, after a backoff with jitter.
_RETRIES = 2
_BACKOFF_BASE_S, _BACKOFF_CAP_S = 0.05, 0.5

_SAVE = """
local p = ARGV[1]
for _, imp in ipairs(cjson.decode(ARGV[2])) do
  local key, first = p .. 's:' .. imp[1], p .. 'imp:' .. imp[1]
  if redis.call('EXISTS', key) == 0 and redis.call('HEXISTS', first, 'json') == 0 then
    redis.call('SET', key, imp[2], 'PX', imp[3])
    redis.call('HINCRBY', p .. 'stored', imp[6], 1)
    for _, name in ipairs(imp[5]) do redis.call('HINCRBY', p .. 'rec:impressions', name, 1) end
    if imp[4] ~= cjson.null then redis.call('HINCRBY', p .. 'arm:impressions', imp[4], 1) end
  end
end
return 0
"""

_EXPIRE = """
local p, last = ARGV[1], tonumber(ARGV[2])
local gone, counts = 0, redis.call('HGETALL', p .. 'stored')
for i = 1, #counts, 2 do
  if tonumber(counts[i]) <= last then
    gone = gone + tonumber(counts[i + 1])
    redis.call('HDEL', p .. 'stored', counts[i])
  end
end
return gone + redis.call('ZREMRANGEBYSCORE', p .. 'index', '-inf', ARGV[3])
"""

_RECORD = """
local p, cutoff = ARGV[1], tonumber(ARGV[2])
local positive = {click = true, purchase = true}
local loaded = {}

-- Byte order, which for UTF-8 is code point order: Python's order of str.
local function before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = a:byte(i), b:byte(i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- The names a record's sources hold: a bit mask over the names, or a list of their indexes.
local function held(sources, names)
  local found = {}
  if type(sources) == 'table' then
    for _, i in ipairs(sources) do table.insert(found, names[i + 1]) end
  else
    for i = 1, #names do
      if sources % 2 == 1 then table.insert(found, names[i]) end
      sources = math.floor(sources / 2)
    end
  end
  return found
end

-- Each shown item as {team = name or nil, sources = {names}}, from a record of either form.
local function shown(data)
  local items = {}
  if data[1] == 2 then
    local names = data[3]
    for _, entry in ipairs(data[4]) do
      if items[entry[1]] == nil then
        local team = entry[3] and names[entry[3] + 1] or nil
        items[entry[1]] = {team = team, sources = held(entry[2], names)}
      end
    end
    return data[2], items
  end
  for _, entry in ipairs(data.i) do
    if items[entry[1]] == nil then
      local sources, seen = {}, {}
      for _, source in ipairs(entry[4]) do
        if not seen[source[1]] then
          seen[source[1]] = true
          table.insert(sources, source[1])
        end
      end
      local team = entry[3] ~= cjson.null and entry[3] or nil
      items[entry[1]] = {team = team, sources = sources}
    end
  end
  return data.a, items
end

-- The live impression `rid` (false if none): its record from s:<rid> ([time in ms, record]),
-- or from the field json of imp:<rid> as the first layout kept it.
local function load(rid)
  if loaded[rid] ~= nil then return loaded[rid] end
  local key, record = p .. 'imp:' .. rid, p .. 's:' .. rid
  local value, data, at = redis.call('GET', record), nil, nil
  if value then
    value = cjson.decode(value)
    at, data = value[1] / 1000, value[2]
  else
    local old = redis.call('HGET', key, 'json')
    if old then
      data = cjson.decode(old)
      at, record = data.t, nil
    end
  end
  local imp = false
  if data and at > cutoff then
    local arm, items = shown(data)
    local seen, teams = {}, {}
    for _, item in pairs(items) do
      if item.team and not seen[item.team] then
        seen[item.team] = true
        table.insert(teams, item.team)
      end
    end
    table.sort(teams, before)
    imp = {key = key, record = record, arm = arm, items = items, teams = teams}
  end
  loaded[rid] = imp
  return imp
end

-- imp:<rid>, made by an impression's first event, lives as long as its record.
local function touched(imp)
  if imp.record then
    redis.call('PEXPIRE', imp.key, redis.call('PTTL', imp.record))
    imp.record = nil
  end
end

local function outcome(clicks, total, a, b)
  if total <= 0 then return nil end
  if clicks[a] > clicks[b] then return 'wins' end
  if clicks[a] < clicks[b] then return 'losses' end
  return 'ties'
end

local function credit(item)
  if item.team then return {item.team}, {[item.team] = 1.0} end
  local shares = {}
  for _, name in ipairs(item.sources) do shares[name] = 1.0 / #item.sources end
  return item.sources, shares
end

local function pairwise(imp, team)
  local was, now, total = {}, {}, 0
  for _, t in ipairs(imp.teams) do
    was[t] = tonumber(redis.call('HGET', imp.key, 't:' .. t) or '0')
    now[t] = was[t]
    total = total + was[t]
  end
  now[team] = now[team] + 1
  for x = 1, #imp.teams do
    for y = x + 1, #imp.teams do
      local a, b = imp.teams[x], imp.teams[y]
      local old, new = outcome(was, total, a, b), outcome(now, total + 1, a, b)
      if old ~= new then
        if old then redis.call('HINCRBY', p .. 'pair:' .. old, a .. '\\31' .. b, -1) end
        redis.call('HINCRBY', p .. 'pair:' .. new, a .. '\\31' .. b, 1)
      end
    end
  end
  redis.call('HINCRBY', imp.key, 't:' .. team, 1)
end

local results = {}
for i, event in ipairs(cjson.decode(ARGV[3])) do
  local imp = load(event[1])
  local item = imp and imp.items[event[2]]
  if not imp then
    results[i] = 'unknown_request'
  elseif item == nil then
    results[i] = 'item_not_shown'
  elseif event[4] ~= cjson.null and redis.call('HSETNX', imp.key, 'e:' .. event[4], 1) == 0 then
    results[i] = 'duplicate'
  else
    if event[4] ~= cjson.null then touched(imp) end
    results[i] = 'accepted'
    redis.call('HINCRBY', p .. 'events', event[3], 1)
    if positive[event[3]] then
      local order, shares = credit(item)
      for _, name in ipairs(order) do
        redis.call('HINCRBY', p .. 'rec:clicks', name, 1)
        redis.call('HINCRBYFLOAT', p .. 'rec:credit', name, string.format('%.17g', shares[name]))
      end
      if item.team then pairwise(imp, item.team) end
      local positives = redis.call('HINCRBY', imp.key, 'pos', 1)
      touched(imp)
      if imp.arm ~= cjson.null then
        if positives == 1 then redis.call('HINCRBY', p .. 'arm:clicked_impressions', imp.arm, 1) end
        redis.call('HINCRBY', p .. 'arm:clicks', imp.arm, 1)
      end
    end
  end
end
return results
"""

_SAVE_WEIGHTS = """
local stored = redis.call('HGET', KEYS[1], 'version')
if stored and tonumber(ARGV[1]) <= tonumber(stored) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'json', ARGV[2])
return 1
"""


def _translated() -> contextlib.AbstractContextManager[None]:
    return store_errors(redis.RedisError, "Redis")


class RedisStore:
    """The feedback store in the Redis database at `url`; see the module docstring."""

    def __init__(
        self,
        url: str,
        retention_s: float,
        clock: Callable[[], float] = time.time,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 5.0,
    ):
        if retention_s <= 0:
            raise ValueError(f"retention_s must be positive, got {retention_s}")
        self.retention_s = retention_s
        self.prefix = prefix
        self._clock = clock
        self._closed = False
        self._bucket_ms = max(1, round(retention_s * 1000 / _BUCKETS))
        # redis-py's own default would send a command 10 more times, timeouts too: a stalled
        # server could hold an operation for eleven timeouts (see the module docstring).
        retry = Retry(
            ExponentialWithJitterBackoff(base=_BACKOFF_BASE_S, cap=_BACKOFF_CAP_S),
            _RETRIES,
            supported_errors=(redis.ConnectionError,),
        )
        self._redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry,
        )
        # register_script sends EVALSHA, and the script itself once if the server lacks it.
        self._save = self._redis.register_script(_SAVE)
        self._record = self._redis.register_script(_RECORD)
        self._save_weights = self._redis.register_script(_SAVE_WEIGHTS)
        self._expire = self._redis.register_script(_EXPIRE)

    def save_impressions(self, impressions: Sequence[StorableImpression]) -> None:
        """Store a batch in one script; a request id already stored keeps its first."""
        if not impressions:
            return
        now = self._clock()
        batch = [
            [
                imp.request_id,
                f"[{round(imp.at * 1000)},{imp.to_json()}]",
                max(1, math.ceil((imp.at + self.retention_s - now) * 1000)),
                imp.arm,
                list(imp.recommenders()),
                str(self._bucket(imp.at)),
            ]
            for imp in impressions
        ]
        with self._translated_open():
            self._save(args=[self.prefix, json.dumps(batch, separators=(",", ":"))])

    def record(self, events: Sequence[FeedbackEvent]) -> list[EventResult]:
        """Judge and count a batch of events in one script, in order; one result each."""
        if not events:
            return []
        cutoff = repr(self._clock() - self.retention_s)
        batch = [[e.request_id, e.item_id, e.event, e.event_id] for e in events]
        with self._translated_open():
            results = self._record(
                args=[self.prefix, cutoff, json.dumps(batch, separators=(",", ":"))]
            )
        return [EventResult(result) for result in cast(list[str], results)]

    def stats(self) -> FeedbackStats:
        """Every counter, read in one MULTI/EXEC, so at one moment."""
        cutoff = self._clock() - self.retention_s
        names = [
            "rec:impressions",
            "rec:clicks",
            "rec:credit",
            "pair:wins",
            "pair:losses",
            "pair:ties",
            "arm:impressions",
            "arm:clicked_impressions",
            "arm:clicks",
            "events",
        ]
        with self._translated_open():
            pipe = self._redis.pipeline(transaction=True)
            for name in names:
                pipe.hgetall(self.prefix + name)
            pipe.hgetall(self.prefix + "stored")
            pipe.zcount(self.prefix + "index", f"({cutoff!r}", "+inf")
            *hashes, buckets, indexed = pipe.execute()
        last = self._bucket(cutoff) - self._bucket_ms
        counts = cast(dict[str, str], buckets)
        stored = int(indexed) + sum(int(n) for bucket, n in counts.items() if int(bucket) > last)
        read = dict(zip(names, cast(list[dict[str, str]], hashes), strict=True))

        def number(name: str, key: str) -> int:
            return int(read[name].get(key, 0))

        recommenders = sorted({*read["rec:impressions"], *read["rec:clicks"]})
        pairs = sorted({*read["pair:wins"], *read["pair:losses"], *read["pair:ties"]})
        arms = sorted({*read["arm:impressions"], *read["arm:clicks"]})
        return FeedbackStats(
            recommenders={
                name: RecommenderCounts(
                    number("rec:impressions", name),
                    number("rec:clicks", name),
                    float(read["rec:credit"].get(name, 0.0)),
                )
                for name in recommenders
            },
            pairwise={
                cast(tuple[str, str], tuple(pair.split(_US, 1))): PairCounts(
                    number("pair:wins", pair),
                    number("pair:losses", pair),
                    number("pair:ties", pair),
                )
                for pair in pairs
            },
            arms={
                arm: ArmCounts(
                    number("arm:impressions", arm),
                    number("arm:clicked_impressions", arm),
                    number("arm:clicks", arm),
                )
                for arm in arms
            },
            events={kind: int(count) for kind, count in sorted(read["events"].items())},
            impressions_stored=int(stored),
        )

    def expire(self) -> int:
        """Forget the count of impressions older than the retention; how many it held.

        Their keys are deleted by Redis at their TTL, and until then `record` finds them
        unknown by the clock.
        """
        cutoff = self._clock() - self.retention_s
        last = self._bucket(cutoff) - self._bucket_ms
        with self._translated_open():
            return int(self._expire(args=[self.prefix, str(last), repr(cutoff)]))

    def _bucket(self, at: float) -> int:
        """The start, in ms, of the stored count's bucket that holds time `at`."""
        return int(at * 1000) // self._bucket_ms * self._bucket_ms

    def load_weights(self) -> LearnedWeights | None:
        """The learnt weights saved last, or None before any."""
        with self._translated_open():
            body = cast(str | None, self._redis.hget(self.prefix + "weights", "json"))
        return None if body is None else LearnedWeights.from_json(body)

    def save_weights(self, weights: LearnedWeights) -> bool:
        """Keep `weights` if their version is newer than the stored one; whether they were."""
        with self._translated_open():
            kept = self._save_weights(
                keys=[self.prefix + "weights"], args=[weights.version, weights.to_json()]
            )
        return bool(kept)

    def close(self) -> None:
        """Close the connection pool; using the store afterwards raises RuntimeError."""
        self._closed = True
        self._redis.close()

    @contextlib.contextmanager
    def _translated_open(self) -> Iterator[None]:
        if self._closed:
            raise RuntimeError("the feedback store is closed")
        with _translated():
            yield
