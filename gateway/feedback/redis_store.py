"""The feedback store in Redis, shared by every gateway instance when scaled out.

Same semantics as `gateway.feedback.sqlite_store.SQLiteStore` (the store contract tests run against
both). Each batch is one Lua script, run with EVALSHA: Redis runs a script atomically, so
instances judging and counting events at once never interleave their read-modify-writes. The
script mirrors `gateway.feedback.impressions.credit_for` and
`gateway.feedback.attribution.pair_outcome`.

Key layout, under `prefix` (default ``fusion-gateway:feedback:``)::

    imp:<request_id>     hash: json (Impression JSON; a salted user hash, never a raw id),
                         pos (positive events so far), t:<team> (credited clicks),
                         e:<event_id> (seen, for duplicates); EXPIRE at the retention
    index                sorted set: request_id scored by its time, for `expire` and counts
    rec:impressions, rec:clicks, rec:credit                  hashes by recommender
    pair:wins, pair:losses, pair:ties                        hashes by "a<US>b", a < b
    arm:impressions, arm:clicked_impressions, arm:clicks     hashes by arm
    events               hash: accepted events by kind
    weights              hash: version, json (LearnedWeights; highest version kept)

Liveness is judged by the injected clock as in SQLite (`now - at < retention_s`); the key
TTLs are the garbage collector when nobody calls `expire`. Scripts name keys they compute, so
this is for a single Redis server (with replicas), not Redis Cluster.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import redis

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
# How many expired impressions one `expire` round trip deletes: Redis serves nobody else while
# a script or command runs, so a backlog is cleared in slices.
_EXPIRE_SLICE = 1000

_SAVE = """
local p = ARGV[1]
for _, imp in ipairs(cjson.decode(ARGV[2])) do
  local key = p .. 'imp:' .. imp[1]
  if redis.call('HSETNX', key, 'json', imp[2]) == 1 then
    redis.call('EXPIRE', key, imp[4])
    redis.call('ZADD', p .. 'index', imp[3], imp[1])
    for _, name in ipairs(imp[6]) do redis.call('HINCRBY', p .. 'rec:impressions', name, 1) end
    if imp[5] ~= cjson.null then redis.call('HINCRBY', p .. 'arm:impressions', imp[5], 1) end
  end
end
return 0
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

local function load(rid)
  if loaded[rid] ~= nil then return loaded[rid] end
  local key = p .. 'imp:' .. rid
  local body = redis.call('HGET', key, 'json')
  local imp = false
  if body then
    local data = cjson.decode(body)
    if data.t > cutoff then
      local items, seen, teams = {}, {}, {}
      for _, entry in ipairs(data.i) do
        if items[entry[1]] == nil then items[entry[1]] = entry end
        local team = entry[3]
        if team ~= cjson.null and not seen[team] then
          seen[team] = true
          table.insert(teams, team)
        end
      end
      table.sort(teams, before)
      imp = {key = key, arm = data.a, items = items, teams = teams}
    end
  end
  loaded[rid] = imp
  return imp
end

local function outcome(clicks, total, a, b)
  if total <= 0 then return nil end
  if clicks[a] > clicks[b] then return 'wins' end
  if clicks[a] < clicks[b] then return 'losses' end
  return 'ties'
end

local function credit(item)
  local team = item[3]
  if team ~= cjson.null then return {team}, {[team] = 1.0} end
  local order, shares = {}, {}
  local share = 1.0 / math.max(#item[4], 1)
  for _, source in ipairs(item[4]) do
    local name = source[1]
    if shares[name] == nil then
      shares[name] = 0.0
      table.insert(order, name)
    end
    shares[name] = shares[name] + share
  end
  return order, shares
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
    results[i] = 'accepted'
    redis.call('HINCRBY', p .. 'events', event[3], 1)
    if positive[event[3]] then
      local order, shares = credit(item)
      for _, name in ipairs(order) do
        redis.call('HINCRBY', p .. 'rec:clicks', name, 1)
        redis.call('HINCRBYFLOAT', p .. 'rec:credit', name, string.format('%.17g', shares[name]))
      end
      if item[3] ~= cjson.null then pairwise(imp, item[3]) end
      local positives = redis.call('HINCRBY', imp.key, 'pos', 1)
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
        self._redis = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        # register_script sends EVALSHA, and the script itself once if the server lacks it.
        self._save = self._redis.register_script(_SAVE)
        self._record = self._redis.register_script(_RECORD)
        self._save_weights = self._redis.register_script(_SAVE_WEIGHTS)

    def save_impressions(self, impressions: Sequence[StorableImpression]) -> None:
        """Store a batch in one script; a request id already stored keeps its first."""
        if not impressions:
            return
        now = self._clock()
        batch = [
            [
                imp.request_id,
                imp.to_json(),
                repr(imp.at),  # a string: Lua would print a number with 14 digits only
                max(1, math.ceil(imp.at + self.retention_s - now)),
                imp.arm,
                list(imp.recommenders()),
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
            pipe.zcount(self.prefix + "index", f"({cutoff!r}", "+inf")
            *hashes, stored = pipe.execute()
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
        """Delete the impressions older than the retention; how many were still there.

        Those whose key Redis already dropped at its TTL are not counted.
        """
        cutoff = repr(self._clock() - self.retention_s)
        index, deleted = self.prefix + "index", 0
        with self._translated_open():
            while True:
                ids = cast(
                    list[str],
                    self._redis.zrangebyscore(index, "-inf", cutoff, start=0, num=_EXPIRE_SLICE),
                )
                if not ids:
                    return deleted
                pipe = self._redis.pipeline(transaction=True)
                pipe.delete(*(self.prefix + "imp:" + rid for rid in ids))
                pipe.zrem(index, *ids)
                removed, _ = pipe.execute()
                deleted += int(removed)

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
