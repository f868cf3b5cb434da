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

Durability: an acknowledged event is as durable as the server's persistence (AOF with
appendfsync everysec/always for production); SQLite is the choice for a single host that
must survive power loss with nothing else configured.
"""
from __future__ import annotations

import json
import time

import redis

from core.store import BucketStats, Doc, DocWrite, FeedbackEvent, ServedRequest, Tally

SEP = "\x1f"

_ADD_FEEDBACK = """
local n = tonumber(ARGV[1])
local tally = ARGV[2] == '1'
local bucket = ARGV[3]
local cap = tonumber(ARGV[4])
local new = 0
local delta = {}
local order = {}
for k = 0, n - 1 do
  local b = 8 + k * 5
  local item, typ, val, ts, rw = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local field = item .. '\\31' .. typ
  if redis.call('HSETNX', KEYS[1], field, ARGV[6] .. '\\31' .. val .. '\\31' .. ts .. '\\31' .. ARGV[7]) == 1 then
    new = new + 1
    local s = redis.call('INCR', KEYS[6])
    redis.call('ZADD', KEYS[2], ts, string.format('%015d', s) .. '\\31' .. field)
    if tally then
      if delta[item] == nil then
        delta[item] = 0
        table.insert(order, item)
      end
      delta[item] = delta[item] + tonumber(rw)
    end
  end
end
if new > 0 then
  redis.call('INCRBY', KEYS[5], new)
  if cap > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -cap - 1) end
end
if tally and #order > 0 then
  local dn, ds, dss = 0, 0, 0
  for _, item in ipairs(order) do
    local d = delta[item]
    local old = redis.call('HGET', KEYS[3], item)
    local o = 0
    if old then o = tonumber(old) else dn = dn + 1 end
    local r = o + d
    redis.call('HSET', KEYS[3], item, string.format('%.17g', r))
    ds = ds + d
    dss = dss + r * r - o * o
  end
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
  redis.call('HINCRBY', KEYS[4], bucket .. '\\31n', dn)
  redis.call('HINCRBYFLOAT', KEYS[4], bucket .. '\\31s', string.format('%.17g', ds))
  redis.call('HINCRBYFLOAT', KEYS[4], bucket .. '\\31q', string.format('%.17g', dss))
end
return new
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
    def __init__(self, url: str, prefix: str = "funnel:", served_ttl_s: float = 7 * 24 * 3600.0, user_events_cap: int = 1000):
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10.0, socket_connect_timeout=5.0)
        self.p = prefix
        self.served_ttl_s = served_ttl_s
        self.user_events_cap = int(user_events_cap)
        self._add = self.r.register_script(_ADD_FEEDBACK)
        self._commit = self.r.register_script(_COMMIT)
        self._acquire = self.r.register_script(_ACQUIRE)
        self._release = self.r.register_script(_RELEASE)
        self.r.ping()

    # ------------------------------------------------------------------ served log

    def log_served(self, served: ServedRequest) -> None:
        ttl_ms = int((served.ts + self.served_ttl_s - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        body = json.dumps({"request_id": served.request_id, "user_id": served.user_id, "bucket": served.bucket,
                           "params": served.params, "items": served.items, "ts": served.ts,
                           "round_id": int(served.round_id), "scene": served.scene})
        self.r.set(f"{self.p}served:{served.request_id}", body, px=ttl_ms)

    def get_served(self, request_id: str) -> ServedRequest | None:
        raw = self.r.get(f"{self.p}served:{request_id}")
        if raw is None:
            return None
        d = json.loads(raw)
        return ServedRequest(d["request_id"], d["user_id"], d["bucket"], d["params"], d["items"], d["ts"],
                             int(d.get("round_id", -1)), d.get("scene", "home"))

    # ------------------------------------------------------------------ feedback

    def add_feedback(self, request_id: str, user_id: str, events: list[FeedbackEvent], tally: Tally | None = None) -> int:
        if tally is not None and len(tally.rewards) != len(events):
            raise ValueError("tally.rewards must align with events")
        p = self.p
        keys = [
            f"{p}fb:{request_id}", f"{p}ue:{user_id}", f"{p}imp:{request_id}",
            f"{p}stats:{tally.scene}:{int(tally.round_id)}" if tally else f"{p}stats:-",
            f"{p}fbn", f"{p}seq",
        ]
        args: list = [len(events), "1" if tally else "0", tally.bucket if tally else "", self.user_events_cap,
                      max(1, int(self.served_ttl_s)), user_id, _num(time.time())]
        for k, e in enumerate(events):
            args += [e.item_id, e.type, "" if e.value is None else _num(e.value), _num(e.ts),
                     _num(tally.rewards[k]) if tally else "0"]
        return int(self._add(keys=keys, args=args))

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

    def bucket_stats(self, scene: str, round_id: int) -> dict[str, BucketStats]:
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
