"""Redis backend of the `Store` protocol (core/store.py), for several workers or hosts.

Selected with `FUNNEL_REDIS_URL` (e.g. redis://127.0.0.1:6379/0); every key starts with
`FUNNEL_REDIS_PREFIX` (default "funnel:"). Same contract as the SQLite store; the
multi-key steps (feedback + dedup + reward statistics, document compare-and-set + history,
lock release) are Lua scripts, so each is atomic on the server.

Keys (P = prefix):
    P served:<request_id>        string, the served request (JSON); expires after the served-log TTL
    P fb:<request_id>            hash "<item>\\x1f<type>" -> user, value, ts, received: the feedback
                                 log, and its dedup (HSETNX)
    P fbn                        number of feedback events stored
    P ue:<user_id>               zset of the user's events, score = event ts, member
                                 "<seq>\\x1f<item>\\x1f<type>" (seq: arrival order, breaks ties);
                                 the newest `user_events_cap` are kept
    P imp:<request_id>           hash item -> running reward of that impression (served-log TTL)
    P stats:<scene>:<round>      hash "<bucket>\\x1f{n,s,q}" -> impressions, Σ reward, Σ reward²
    P doc:<key>                  hash v (version), d (JSON)
    P hist:<scene>, P hseq:<scene>   zset of history entries by seq, and the seq counter
    P roundmark:<scene>:<round>  set when a round's "round" history entry is written (once)
    P lock:<name>                owner, with a PX expiry
    P fbstream                   stream of new feedback (one entry per feedback call with new
                                 events: request, tally scene/round/bucket, [item, type, reward]…),
                                 consumer group "tally"; entries are deleted once applied

Feedback (scale-out, several workers or hosts). A feedback call is one script: the dedup log
(HSETNX on (request_id, item_id, type)), the user's real-time history and an XADD to the
feedback stream, atomically; so a 202 means the events are in Redis (as durable as its
persistence: AOF appendfsync everysec/always) and any worker's next feed for the user reads
them (read-your-writes without waiting for a consumer). The heavier, order-independent work,
the tuner's per-impression reward and per-bucket statistics, is done by the consumer group:
every worker runs a consumer thread (app/state.py); each entry is XACKed and applied in one
script, and applied only if the XACK removed it from the pending list, so redelivery
(at-least-once: a consumer that died holding entries is taken over after CLAIM_IDLE_MS) never
counts an event twice, and a duplicate event never reaches the stream (dedup happens first).
Readers of the statistics (`bucket_stats`: the tuner's round close, admin, /metrics) catch up
with the stream first, so they never miss an acknowledged event not held by a live consumer.

Durability: an acknowledged event is as durable as the server's persistence (AOF with
appendfsync everysec/always for production); SQLite is the choice for a single host that
must survive power loss with nothing else configured.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

import redis

from core.store import BucketStats, Doc, DocWrite, FeedbackEvent, ServedRequest, Tally

SEP = "\x1f"

# Synchronous part of a feedback call (one atomic script): dedup, the user's real-time
# history, the feedback counter, and one stream entry holding the new events with their
# tally context. Acknowledged == in the dedup log, in the history and in the stream.
_ADD_FEEDBACK = """
local n = tonumber(ARGV[1])
local cap = tonumber(ARGV[6])
local new = 0
local fresh = {}
for k = 0, n - 1 do
  local b = 10 + k * 5
  local item, typ, val, ts, rw = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local field = item .. '\\31' .. typ
  if redis.call('HSETNX', KEYS[1], field, ARGV[7] .. '\\31' .. val .. '\\31' .. ts .. '\\31' .. ARGV[8]) == 1 then
    new = new + 1
    local s = redis.call('INCR', KEYS[4])
    redis.call('ZADD', KEYS[2], ts, string.format('%015d', s) .. '\\31' .. field)
    table.insert(fresh, {item, typ, rw})
  end
end
if new > 0 then
  redis.call('INCRBY', KEYS[3], new)
  if cap > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -cap - 1) end
  redis.call('XADD', KEYS[5], '*', 'rid', ARGV[9], 'tally', ARGV[2], 'scene', ARGV[3], 'round', ARGV[4], 'bucket', ARGV[5],
             'ev', cjson.encode(fresh))
end
return new
"""

# Asynchronous part, per stream entry, by whichever consumer of the group holds it: the
# entry is acknowledged and applied in one atomic step, and only if the XACK removed it from
# the pending list, so an entry delivered twice (a consumer that stalled past the claim
# time, a crash between read and apply) is applied exactly once. Applied entries are deleted.
_APPLY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[3] ~= '1' then return 1 end
local ev = cjson.decode(ARGV[6])
local delta = {}
local order = {}
for _, e in ipairs(ev) do
  local item = e[1]
  if delta[item] == nil then
    delta[item] = 0
    table.insert(order, item)
  end
  delta[item] = delta[item] + tonumber(e[3])
end
local dn, ds, dss = 0, 0, 0
for _, item in ipairs(order) do
  local d = delta[item]
  local old = redis.call('HGET', KEYS[2], item)
  local o = 0
  if old then o = tonumber(old) else dn = dn + 1 end
  local r = o + d
  redis.call('HSET', KEYS[2], item, string.format('%.17g', r))
  ds = ds + d
  dss = dss + r * r - o * o
end
if #order > 0 then
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
  redis.call('HINCRBY', KEYS[3], ARGV[4] .. '\\31n', dn)
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[4] .. '\\31s', string.format('%.17g', ds))
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[4] .. '\\31q', string.format('%.17g', dss))
end
return 1
"""

_COMMIT = """
local nw = tonumber(ARGV[1])
local nh = tonumber(ARGV[2])
for i = 1, nw do
  local exp = ARGV[2 + (i - 1) * 2 + 1]
  if exp ~= '' then
    local v = redis.call('HGET', KEYS[i], 'v')
    local cur = 0
    if v then cur = tonumber(v) end
    if cur ~= tonumber(exp) then return 0 end
  end
end
local hb = 2 + nw * 2
for j = 1, nh do
  if ARGV[hb + (j - 1) * 2 + 1] == 'round' and redis.call('EXISTS', KEYS[nw + (j - 1) * 3 + 3]) == 1 then
    return 0
  end
end
for i = 1, nw do
  redis.call('HINCRBY', KEYS[i], 'v', 1)
  redis.call('HSET', KEYS[i], 'd', ARGV[2 + (i - 1) * 2 + 2])
end
for j = 1, nh do
  local seq = redis.call('INCR', KEYS[nw + (j - 1) * 3 + 2])
  redis.call('ZADD', KEYS[nw + (j - 1) * 3 + 1], seq, string.format('%015d', seq) .. '\\31' .. ARGV[hb + (j - 1) * 2 + 2])
  if ARGV[hb + (j - 1) * 2 + 1] == 'round' then redis.call('SET', KEYS[nw + (j - 1) * 3 + 3], seq) end
end
return 1
"""

_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _num(x: float) -> str:
    return repr(float(x))


class RedisStore:
    GROUP = "tally"  # the consumer group applying the feedback stream to the tuner's statistics
    CLAIM_IDLE_MS = 30_000  # an entry read but not applied for this long is taken over by another consumer

    def __init__(self, url: str, prefix: str = "funnel:", served_ttl_s: float = 7 * 24 * 3600.0, user_events_cap: int = 1000,
                 timeout_s: float = 10.0):
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=min(5.0, timeout_s))
        self.p = prefix
        self.served_ttl_s = served_ttl_s
        self.user_events_cap = int(user_events_cap)
        self.stream = f"{prefix}fbstream"
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._next_claim = 0.0
        self._add = self.r.register_script(_ADD_FEEDBACK)
        self._apply = self.r.register_script(_APPLY)
        self._commit = self.r.register_script(_COMMIT)
        self._acquire = self.r.register_script(_ACQUIRE)
        self._release = self.r.register_script(_RELEASE)
        self.r.ping()
        self._ensure_group()

    # ------------------------------------------------------------------ served log

    def log_served(self, served: ServedRequest) -> None:
        ttl_ms = int((served.ts + self.served_ttl_s - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        self.r.set(f"{self.p}served:{served.request_id}", served.to_json(), px=ttl_ms)

    def get_served(self, request_id: str) -> ServedRequest | None:
        raw = self.r.get(f"{self.p}served:{request_id}")
        if raw is None:
            return None
        return ServedRequest.from_json(raw)

    # ------------------------------------------------------------------ feedback

    def add_feedback(self, request_id: str, user_id: str, events: list[FeedbackEvent], tally: Tally | None = None) -> int:
        """Synchronous: dedup, the user's history (so the next feed, from any worker, reflects
        the events) and the stream entry, in one script. The tally is applied from the stream
        by the consumer group (`consume_feedback`); `bucket_stats` catches up first."""
        if tally is not None and len(tally.rewards) != len(events):
            raise ValueError("tally.rewards must align with events")
        p = self.p
        keys = [f"{p}fb:{request_id}", f"{p}ue:{user_id}", f"{p}fbn", f"{p}seq", self.stream]
        args: list = [len(events), "1" if tally else "0", tally.scene if tally else "", int(tally.round_id) if tally else -1,
                      tally.bucket if tally else "", self.user_events_cap, user_id, _num(time.time()), request_id]
        for k, e in enumerate(events):
            args += [e.item_id, e.type, "" if e.value is None else _num(e.value), _num(e.ts),
                     _num(tally.rewards[k]) if tally else "0"]
        return int(self._add(keys=keys, args=args))

    # ------------------------------------------------------------------ the feedback stream

    def _ensure_group(self) -> None:
        try:
            # From id 0: entries written before the group existed are delivered too.
            self.r.xgroup_create(self.stream, self.GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def consume_feedback(self, consumer: str | None = None, count: int = 256, block_ms: int | None = None) -> int:
        """Read entries of the feedback stream as `consumer` of the group and apply each to the
        tuner statistics exactly once (see _APPLY). Entries another consumer read but left
        unapplied for CLAIM_IDLE_MS are claimed too (at-least-once delivery). Returns the
        number of entries this call applied."""
        consumer = consumer or self.consumer
        entries: list = []
        try:
            now = time.monotonic()
            if now >= self._next_claim:
                self._next_claim = now + 5.0
                claimed = self.r.xautoclaim(self.stream, self.GROUP, consumer, self.CLAIM_IDLE_MS, start_id="0-0", count=count)
                entries += claimed[1]
            for _, msgs in self.r.xreadgroup(self.GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms) or []:
                entries += msgs
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._ensure_group()
            return 0
        return self._apply_entries(entries)

    def _apply_entries(self, entries: list) -> int:
        if not entries:
            return 0
        p = self.p
        ttl = max(1, int(self.served_ttl_s))
        pipe = self.r.pipeline(transaction=False)
        for entry_id, f in entries:
            f = f or {}
            tally = f.get("tally") == "1"
            keys = [self.stream, f"{p}imp:{f.get('rid', '')}", f"{p}stats:{f.get('scene', '')}:{f.get('round', '-1')}"]
            self._apply(keys=keys, args=[self.GROUP, entry_id, "1" if tally else "0", f.get("bucket", ""), ttl, f.get("ev", "[]")], client=pipe)
        return sum(int(x) for x in pipe.execute())

    def stream_backlog(self) -> int:
        """Entries in the stream not yet applied (read or not)."""
        return int(self.r.xlen(self.stream))

    def user_events(self, user_id: str, limit: int) -> list[tuple[str, str, float]]:
        rows = self.r.zrevrange(f"{self.p}ue:{user_id}", 0, max(0, int(limit)) - 1, withscores=True)
        out = []
        for member, ts in rows:
            _, item, typ = member.split(SEP, 2)
            out.append((item, typ, float(ts)))
        return out

    def feedback_count(self) -> int:
        return int(self.r.get(f"{self.p}fbn") or 0)

    # ------------------------------------------------------------------ tuner state

    def bucket_stats(self, scene: str, round_id: int, settle_s: float = 0.0) -> dict[str, BucketStats]:
        """Catches up with the feedback stream first (read barrier): every event acknowledged
        before this call and not held by another live consumer is counted; with `settle_s`,
        also waits up to that long for the entries other consumers hold (read, not yet applied)."""
        deadline = time.monotonic() + settle_s
        while True:
            for _ in range(100):
                if self.consume_feedback(count=1000) == 0:
                    break
            if settle_s <= 0 or time.monotonic() > deadline or not self.r.xpending(self.stream, self.GROUP)["pending"]:
                break
            time.sleep(0.01)
        raw = self.r.hgetall(f"{self.p}stats:{scene}:{int(round_id)}")
        acc: dict[str, dict[str, str]] = {}
        for field, v in raw.items():
            bucket, part = field.rsplit(SEP, 1)
            acc.setdefault(bucket, {})[part] = v
        return {b: BucketStats(int(float(d.get("n", 0))), float(d.get("s", 0.0)), float(d.get("q", 0.0))) for b, d in acc.items()}

    def get_doc(self, key: str) -> Doc | None:
        v, d = self.r.hmget(f"{self.p}doc:{key}", "v", "d")
        return None if v is None or d is None else Doc(int(v), json.loads(d))

    def commit(self, writes: list[DocWrite], history: list[dict] | None = None) -> bool:
        history = history or []
        p = self.p
        keys = [f"{p}doc:{w.key}" for w in writes]
        args: list = [len(writes), len(history)]
        for w in writes:
            args += ["" if w.expect is None else int(w.expect), json.dumps(w.value)]
        for h in history:
            scene = h["scene"]
            keys += [f"{p}hist:{scene}", f"{p}hseq:{scene}", f"{p}roundmark:{scene}:{h.get('round')}"]
            args += [h["kind"], json.dumps(h)]
        return int(self._commit(keys=keys, args=args)) == 1

    def history(self, scene: str, limit: int = 100, before: int | None = None, kind: str | None = None) -> list[dict]:
        out: list[dict] = []
        hi = "+inf" if before is None else f"({int(before)}"
        key = f"{self.p}hist:{scene}"
        while len(out) < limit:
            page = self.r.zrevrangebyscore(key, hi, "-inf", start=0, num=max(limit, 50))
            if not page:
                break
            for member in page:
                seq, body = member.split(SEP, 1)
                entry = {**json.loads(body), "seq": int(seq)}
                if kind is None or entry.get("kind") == kind:
                    out.append(entry)
                    if len(out) >= limit:
                        break
            hi = f"({int(page[-1].split(SEP, 1)[0])}"
        return out

    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        return int(self._acquire(keys=[f"{self.p}lock:{name}"], args=[owner, max(1, int(ttl_s * 1000))])) == 1

    def release_lock(self, name: str, owner: str) -> None:
        self._release(keys=[f"{self.p}lock:{name}"], args=[owner])

    # ------------------------------------------------------------------ housekeeping

    def flush_prefix(self) -> int:
        """Delete every key under this store's prefix (tests; never in serving)."""
        n = 0
        batch = []
        for k in self.r.scan_iter(match=f"{self.p}*", count=1000):
            batch.append(k)
            if len(batch) >= 500:
                n += self.r.delete(*batch)
                batch = []
        if batch:
            n += self.r.delete(*batch)
        return n

    def close(self) -> None:
        self.r.close()
