-- KEYS: challenge key, seen key, the VM's own seen key (the seen key again when there is no scope), the
-- caller's retry mark of this claim (attest:{<digest>}:retry:<digest of client id and scope>).
-- ARGV: client id, "1" when a challenge is required, seen lifetime (ms, relative: an absolute PXAT from the
-- caller's clock would vanish at once on a server whose clock runs ahead), claim token, scope tag ("" for none),
-- the most VMs a seen value lists (MAX_LISTED_SCOPES).
-- Seen values, one key per nonce:
--   "C|<token>|<client id>"  a consumed challenge: refuses every later claim;
--   "N|<token>|<client id>"  a caller-chosen nonce claimed without a scope: refuses every later claim;
--   "V|<tag>:<token>[,<tag>:<token>...]"  a caller-chosen nonce claimed for each VM listed (tag: the scope's
--                            digest), at most MAX_LISTED_SCOPES of them: refuses later claims of those VMs
--                            only, and claims without a scope;
--   "W|<tag>:<token>,..."    the same list once full: further VMs of the nonce get a key each
--                            (attest:{<digest>}:seen:<tag>, holding the token), with its own lifetime, so that
--                            a nonce many VMs share (a vendor's fixed nonce) costs one small key per VM and
--                            O(1) per claim, not a value that grows with the fleet and is rewritten each time.
--                            The previous release reads "V" lists but not these keys; to it "W" is an unknown
--                            kind, which it refuses as replayed, so a rolling upgrade cannot accept a VM twice;
--   "0|<client id>", "1|<client id>"  written before claims carried a token or a scope: refuse every claim.
-- Releases before scoping read any value as "replayed", so during a rolling upgrade they refuse what this one
-- accepted (as they always did), and this one refuses what they accepted.
-- Challenge values: "<expires ms>|<client id>".
-- The token is random per claim: redis-py resends the whole script when the connection breaks, and a resent
-- claim that finds its own token was the one that won (its first answer was lost). It rewrites its record, so
-- that a WAIT after the script, on the retry's new connection, covers the record too.
-- A claim that ran but whose answer never reached the service (a timeout after the script ran, a WAIT that too
-- few replicas confirmed) was answered 503; the service then leaves a retry mark holding that claim's token,
-- under a key only the same client with the same scope names. The caller's retry of the same document finds
-- its old token in the record and in its mark: it is accepted (and confirmed again by its WAIT), the record
-- taking the retry's token and the mark going away. Anyone else, and this caller after a confirmed claim
-- (no mark), is refused as before.
-- A record that replaces or extends another keeps the longer of the two lifetimes.
-- Returns {"replayed", <1|0 challenge>, <client id>} | {"accepted", <1|0>} (a resent claim) | {"challenge"} |
-- {"foreign"} | {"unknown"} | {"seen"}.

local function record(value, previous)
  local ttl = tonumber(ARGV[3])
  if previous then
    local left = redis.call('PTTL', KEYS[2])
    if left > ttl then ttl = left end
  end
  redis.call('SET', KEYS[2], value, 'PX', ttl)
end
-- Whether the caller's retry mark names ``token``: a claim of this caller whose answer was lost. The mark is
-- spent by the retry it admits.
local function marked(token)
  if KEYS[4] == nil then
    return false
  end
  if redis.call('GET', KEYS[4]) == token then
    redis.call('DEL', KEYS[4])
    return true
  end
  return false
end
local seen = redis.call('GET', KEYS[2])
local listed = 0
if seen then
  local kind = string.sub(seen, 1, 1)
  if kind == 'C' or kind == 'N' then
    local sep = string.find(seen, '|', 3, true)
    local challenge = kind == 'C' and '1' or '0'
    if string.sub(seen, 3, sep - 1) == ARGV[4] then
      redis.call('SET', KEYS[2], seen, 'KEEPTTL')
      return {'accepted', challenge}
    end
    if marked(string.sub(seen, 3, sep - 1)) then
      redis.call('SET', KEYS[2], kind .. '|' .. ARGV[4] .. string.sub(seen, sep), 'KEEPTTL')
      return {'accepted', challenge}
    end
    return {'replayed', challenge, string.sub(seen, sep + 1)}
  elseif kind == 'V' or kind == 'W' then
    if ARGV[5] == '' then
      return {'replayed', '0', ''}
    end
    local at = string.find(seen, ARGV[5] .. ':', 3, true)
    if at then
      local entry = ARGV[5] .. ':' .. ARGV[4]
      if string.sub(seen, at, at + #entry - 1) == entry then
        redis.call('SET', KEYS[2], seen, 'KEEPTTL')
        return {'accepted', '0'}
      end
      local first = at + #ARGV[5] + 1
      local last = (string.find(seen, ',', first, true) or (#seen + 1)) - 1
      if marked(string.sub(seen, first, last)) then
        redis.call('SET', KEYS[2], string.sub(seen, 1, first - 1) .. ARGV[4] .. string.sub(seen, last + 1), 'KEEPTTL')
        return {'accepted', '0'}
      end
      return {'replayed', '0', ''}
    end
    local own = redis.call('GET', KEYS[3])
    if own then
      if own == ARGV[4] then
        redis.call('SET', KEYS[3], own, 'KEEPTTL')
        return {'accepted', '0'}
      end
      if marked(own) then
        redis.call('SET', KEYS[3], ARGV[4], 'KEEPTTL')
        return {'accepted', '0'}
      end
      return {'replayed', '0', ''}
    end
    if kind == 'W' then
      listed = -1
    else
      local _, commas = string.gsub(seen, ',', ',')
      listed = commas + 1
    end
  else
    local sep = string.find(seen, '|', 1, true)
    return {'replayed', string.sub(seen, 1, sep - 1), string.sub(seen, sep + 1)}
  end
end
local challenge = redis.call('GET', KEYS[1])
if challenge then
  local sep = string.find(challenge, '|', 1, true)
  if string.sub(challenge, sep + 1) ~= ARGV[1] then
    return {'foreign'}
  end
  redis.call('DEL', KEYS[1])
  record('C|' .. ARGV[4] .. '|' .. ARGV[1], seen)
  return {'challenge'}
end
if ARGV[2] == '1' then
  return {'unknown'}
end
if ARGV[5] == '' then
  record('N|' .. ARGV[4] .. '|' .. ARGV[1], seen)
elseif not seen then
  record('V|' .. ARGV[5] .. ':' .. ARGV[4], seen)
elseif listed >= 0 and listed < tonumber(ARGV[6]) then
  record(seen .. ',' .. ARGV[5] .. ':' .. ARGV[4], seen)
else
  -- The list is full: this VM's claim gets a key of its own, and the list, marked full ("W"), lives as long
  -- as the longest claim.
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[3])
  record('W' .. string.sub(seen, 2), seen)
end
return {'seen'}
