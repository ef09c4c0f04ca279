//! The Lua scripts of the Redis backend. Each runs atomically on the server.
//!
//! Conventions, because Lua and Redis disagree about numbers and nil:
//! - every number a script stores or returns goes through `s(n)` (`%.0f`): Lua numbers are
//!   doubles and Redis formats them with `%.14g` (1e14 and above lose digits); `%.0f` is exact
//!   for integers below 2^53, which every value here stays under (tokens: 2^37 grants per
//!   scope times 2^16);
//! - a missing hash field reads as `false`; scripts never put `nil` or `false` in a reply
//!   (a Lua array ends at the first nil), absent values are `''` with a flag beside them;
//! - the time is the server's (`TIME`), in ms.

/// Shared prelude: the server's clock and number formatting.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function s(n) return string.format('%.0f', n) end
";

/// The claim. KEYS: record, the scope's token counter, the scope's expiry index. ARGV:
/// fingerprint, lease ms, retention ms, owner id, quota (`''`: none), nonce (0–65535), an
/// owner id known to be gone (`''`: none), the index member (the key in hex).
///
/// Replies `{verdict, now, ...}`:
/// - `acquire, now, token, lease_until, attempt, takeover(0/1), has_checkpoint(0/1), checkpoint`
/// - `replay, now, outcome, completed_at, attempt`
/// - `in_progress, now, lease_until, owner`
/// - `mismatch, now` and `quota, now`
const CLAIM_BODY: &str = r"
local r = redis.call('HMGET', KEYS[1], 'fp', 'st', 'own', 'lu', 'att', 'cp', 'out', 'up', 'ex', 'cr')
local exists = r[1] ~= false
local fresh = (not exists) or tonumber(r[9]) <= now
local attempt, takeover, cp, created, ex = 1, '0', false, now, now + tonumber(ARGV[3])
if fresh then
  if ARGV[5] ~= '' then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', s(now))
    if not exists and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then
      return {'quota', s(now)}
    end
  end
else
  if r[1] ~= ARGV[1] then return {'mismatch', s(now)} end
  if r[2] == '1' then return {'replay', s(now), r[7] or '', r[8], r[5]} end
  if r[2] == '0' then
    if tonumber(r[4]) > now and r[3] ~= ARGV[7] then
      return {'in_progress', s(now), r[4], r[3]}
    end
    takeover = '1'
  end
  attempt = tonumber(r[5]) + 1
  cp = r[6]
  created = tonumber(r[10])
  ex = math.max(ex, tonumber(r[9]))
end
local seq = redis.call('INCR', KEYS[2])
local token = s(seq * 65536 + tonumber(ARGV[6]))
local lu = now + tonumber(ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'st', '0', 'tok', token, 'own', ARGV[4],
  'lu', s(lu), 'att', s(attempt), 'cr', s(created), 'up', s(now), 'ex', s(ex))
if cp then redis.call('HSET', KEYS[1], 'cp', cp) end
redis.call('PEXPIREAT', KEYS[1], s(ex))
redis.call('ZADD', KEYS[3], s(ex), ARGV[8])
if cp then
  return {'acquire', s(now), token, s(lu), s(attempt), takeover, '1', cp}
end
return {'acquire', s(now), token, s(lu), s(attempt), takeover, '0', ''}
";

/// A fenced lease write. KEYS: record, the scope's expiry index. ARGV: operation
/// (`complete`, `fail`, `extend`, `checkpoint`), token, argument, second argument, the index
/// member. Replies `{'lost'}` when the record is not in flight under the token or has expired
/// (nothing changed), else `{'ok'}` (`{'ok', lease_until}` for `extend`).
const LEASE_BODY: &str = r"
local r = redis.call('HMGET', KEYS[1], 'st', 'tok', 'ex')
if r[1] ~= '0' or r[2] ~= ARGV[2] or tonumber(r[3]) <= now then return {'lost'} end
local op = ARGV[1]
if op == 'complete' then
  local ex = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'st', '1', 'out', ARGV[3], 'up', s(now), 'ex', s(ex))
  redis.call('HDEL', KEYS[1], 'cp')
  redis.call('PEXPIREAT', KEYS[1], s(ex))
  redis.call('ZADD', KEYS[2], s(ex), ARGV[5])
  return {'ok'}
elseif op == 'fail' then
  redis.call('HSET', KEYS[1], 'st', '2', 'up', s(now))
  return {'ok'}
elseif op == 'extend' then
  local lu = now + tonumber(ARGV[3])
  local ex = math.max(tonumber(r[3]), lu)
  redis.call('HSET', KEYS[1], 'lu', s(lu), 'ex', s(ex), 'up', s(now))
  redis.call('PEXPIREAT', KEYS[1], s(ex))
  redis.call('ZADD', KEYS[2], s(ex), ARGV[5])
  return {'ok', s(lu)}
elseif op == 'checkpoint' then
  redis.call('HSET', KEYS[1], 'cp', ARGV[3], 'up', s(now))
  return {'ok'}
end
return redis.error_reply('unknown lease operation ' .. op)
";

/// Reads a record. KEYS: record. Replies `{now, field, value, field, value, ...}`.
const GET_BODY: &str = r"
local out = {s(now)}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do out[#out + 1] = all[i] end
return out
";

/// Removes a record. KEYS: record, the scope's expiry index. ARGV: the index member.
/// Replies 1 if a live record was there, else 0.
const FORGET_BODY: &str = r"
local ex = redis.call('HGET', KEYS[1], 'ex')
redis.call('ZREM', KEYS[2], ARGV[1])
if not ex then return 0 end
redis.call('DEL', KEYS[1])
if tonumber(ex) > now then return 1 end
return 0
";

/// The scripts, ready to run (each sent by its SHA-1, loaded on first use).
pub(crate) struct Scripts {
    pub claim: redis::Script,
    pub lease: redis::Script,
    pub get: redis::Script,
    pub forget: redis::Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        let script = |body: &str| redis::Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            claim: script(CLAIM_BODY),
            lease: script(LEASE_BODY),
            get: script(GET_BODY),
            forget: script(FORGET_BODY),
        }
    }
}
