-- fdngx.health: whether a peer may take new requests (pure Lua: no ngx, testable with luajit).
--
-- Two opinions meet here:
--   * the balancer's own, first-hand: a request that could not connect (or timed out), or a 502/503/504
--     from the peer, takes it out at once for a back-off of 0.5 s doubling per consecutive failure up to
--     8 s (failures while it is out are the same one). While it is out, an active probe (GET /health, only
--     200 counts, one per peer every 0.25 s across all workers) keeps it out while it fails and brings it
--     back on its first 200, unless it is flapping (more than FLAP_LEVEL failures in a row without a
--     success: /health says 200 but requests fail), in which case only the back-off's end lets it try
--     again. A request that succeeds resets the back-off; a failed probe says it is down, not flapping.
--   * the sidecar's, pushed as `down` (K failed /health checks, 2 good ones to come back, every 2 s).
--
-- The rule when they disagree:
--   * the balancer out, the sidecar up: the balancer wins. Its evidence is this frontend's own failed
--     connections and probes; the sidecar checks from elsewhere, every few seconds, and keeps a replica
--     whose /health is refused "up" for a grace period on purpose (nginx's passive check covers it).
--     This lasts only as long as fresh evidence does: without a new failure the back-off ends by itself.
--   * the sidecar down, the balancer up: the balancer wins only when it saw the peer come back (out, then
--     a probe 200) after the sidecar said down, and only for DISAGREE_FOR (10 s) from that moment; the
--     sidecar needs 2 good checks (~4 s) to agree. If it still says down after that, the sidecar wins (it
--     holds the peer out for a reason of its own) until either side changes its mind.
--   * unless the sidecar went silent: a snapshot not pushed again for fdngx.store.SILENT_AFTER (10 s, five
--     cycles; three of its pusher's intervals when it pushes less often: fdngx.store.hold) no longer holds a
--     peer out. Its `down` is then as old as the snapshot, and the sidecar that
--     would lift it is gone (a dead controller left every replica it held down out of every frontend for
--     good): the balancer's own probes decide, as for a peer the sidecar says is up, except that a peer the
--     snapshot says down comes back only on the balancer's evidence, a /health 200 (`ok_at`) with no failure
--     since. The probes never stop for it (needs_probe: it is still the sidecar's down).
--
-- A record is { out = bool, level = n, till = t, changed = t, ok_at = t } (times: ngx.now() seconds);
-- it lives in the shared dict as one string (encode/decode) so every worker sees one state. ok_at: the last
-- probe 200, as of the record's last change (fdngx.pool.mark writes no change of ok_at alone, but the first
-- 200 of a record is a change); it decides only whether a silent sidecar's down peer has answered at all.

local M = {}

M.BASE = 0.5 -- seconds out after the first failure
M.MAX = 8.0 -- longest back-off
M.FLAP_LEVEL = 3 -- request failures in a row after which a probe 200 alone no longer brings a peer back
M.MAX_LEVEL = 5 -- the back-off's steps: BASE * 2^(level - 1) reaches MAX here (0.5, 1, 2, 4, 8 s)
-- A failed probe keeps the peer out at least HOLD longer (probes run every PROBE_EVERY); when less than that
-- is left, it holds it for HOLD_FOR. In steps, not to "now + HOLD" at every probe: each change of a record
-- moves `ver` and makes every worker re-read every record (fdngx.pool.mark), and a replica that stays down
-- would do that at every probe (4 times a second) for as long as it is down; now once per HOLD_FOR - HOLD.
-- The hold's length matters little: a probe's 200 brings the peer back at once (probes run while it is
-- out), except a flapping one's (see on_probe), which waits up to HOLD_FOR after its last failed probe.
-- A peer the sidecar holds down is held HOLD_DOWN: it takes no pick either way, and a fleet of 1,000 with 100
-- such replicas dead would otherwise move `ver` 67 times a second (every worker re-reading 1,000 records each
-- time) for as long as they stay dead; now 11 times. Its hold matters only for the balancer's fail-open,
-- which must not guess onto it (fdngx.pick.choose's fallback): a failed probe also says it is not flapping
-- (on_probe), so its first 200 still brings it back at once.
M.HOLD = 0.5
M.HOLD_FOR = 2.0
M.HOLD_DOWN = 10.0
M.PROBE_EVERY = 0.25
M.DISAGREE_FOR = 10.0

local floor, max, min, tonumber, format = math.floor, math.max, math.min, tonumber, string.format

function M.new()
    return { out = false, level = 0, till = 0, changed = 0, ok_at = 0 }
end

-- Fixed width (times to 2286): a record rewritten in place. nginx frees a shared-dict value whose size
-- changes before it stores the new one, and a full dict that has no room for it then has lost the old too.
function M.encode(h)
    return format("%d %2d %14.3f %14.3f %14.3f", h.out and 1 or 0, h.level, h.till, h.changed, h.ok_at)
end

function M.decode(s)
    if type(s) ~= "string" then return M.new() end
    local out, level, till, changed, ok_at = s:match("^([01]) +(%d+) +([%d.]+) +([%d.]+) +([%d.]+)$")
    if not out then return M.new() end
    return { out = out == "1", level = tonumber(level), till = tonumber(till), changed = tonumber(changed),
             ok_at = tonumber(ok_at) }
end

local function copy(h)
    return { out = h.out, level = h.level, till = h.till, changed = h.changed, ok_at = h.ok_at }
end

function M.backoff(level)
    return min(M.MAX, M.BASE * 2 ^ max(0, level - 1))
end

-- The balancer's own opinion now: out while a failure's back-off (or a failed probe's hold) lasts.
function M.balancer_out(h, now)
    return h.out and now < h.till
end

-- A request failed on this peer (connect error, timeout, 502/503/504): out at once, for the back-off of one
-- more consecutive failure. A failure while the peer is already out belongs to the same episode (a request
-- picked before it went out, or a fail-open guess onto it) and changes nothing: the level counts episodes,
-- not requests. Counted per request, N requests failing at once (a replica killed with non-streaming requests
-- open, a full accept queue in a spike) made N consecutive failures: a healthy replica was taken for
-- flapping and held out for the 8 s back-off, its /health 200 ignored, its load poured onto the others. And
-- a record moved at each failure would make every worker re-read every record at each one (`ver`,
-- fdngx.pool.mark). Returning `h` itself: no change.
function M.on_failure(h, now)
    if M.balancer_out(h, now) then return h end
    local level = min(h.level + 1, M.MAX_LEVEL)
    local n = copy(h)
    n.level, n.till, n.out, n.changed = level, max(h.till, now + M.backoff(level)), true, now
    return n
end

-- A request got a response from this peer that is not a failure: the back-off starts over.
function M.on_success(h, now)
    if h.level == 0 and not h.out then return h end
    local n = copy(h)
    n.level = 0
    if h.out then n.out, n.till, n.changed = false, 0, now end
    return n
end

-- A probe finished: ok is true for a 200 on /health. `out` stays set after a back-off lapses by itself,
-- so the first 200 afterwards still counts as a recovery the balancer saw (see usable). `sidecar_down`: the
-- sidecar holds the peer down (a failed probe then holds it HOLD_DOWN, not HOLD_FOR).
-- A failed probe also brings the level down to FLAP_LEVEL: the peer is down, not flapping (that is /health
-- 200 while requests fail), so its first 200 brings it back at once. Without it, a replica killed with more
-- than FLAP_LEVEL requests waiting for their headers (non-streaming ones, or several connects at once) was
-- taken for flapping, and once restarted waited out up to a hold after its last failed probe.
function M.on_probe(h, ok, now, sidecar_down)
    local n = copy(h)
    if ok then
        n.ok_at = now
        if h.out and (h.level <= M.FLAP_LEVEL or now >= h.till) then
            n.out, n.till, n.changed = false, 0, now
        end
    else
        n.level = min(h.level, M.FLAP_LEVEL)
        if h.till < now + M.HOLD then n.till = now + (sidecar_down and M.HOLD_DOWN or M.HOLD_FOR) end
        if not M.balancer_out(h, now) then n.out, n.changed = true, now end
    end
    return n
end

-- Do two records differ in what the picks, the log phase or the status view read (all but ok_at, which
-- only says when the last probe answered 200)? Only such a change needs every worker to re-read.
function M.differs(a, b)
    return a.out ~= b.out or a.level ~= b.level or a.till ~= b.till or a.changed ~= b.changed
        or (a.ok_at == 0) ~= (b.ok_at == 0)
end

-- Probe this peer? While the balancer holds it out, and while the sidecar says it is down (so the
-- balancer sees a restarted replica's first 200 itself).
function M.needs_probe(h, sidecar_down, now)
    return sidecar_down or M.balancer_out(h, now)
end

-- May this peer take new requests? Returns the answer and the state for the status view:
-- "up", "out" (the balancer's back-off), "down" (the sidecar's), "probe-up" (the balancer's recovery
-- overrides the sidecar's down for now), "own-up" (`silent`: the snapshot saying down is older than
-- fdngx.store.SILENT_AFTER, and the balancer's own probes say up).
function M.usable(h, sidecar_down, sidecar_at, now, silent)
    if M.balancer_out(h, now) then return false, "out" end
    if not sidecar_down then return true, "up" end
    if silent then
        if not h.out and h.ok_at > 0 then return true, "own-up" end
        return false, "down"
    end
    if not h.out and h.changed > sidecar_at and now - h.changed < M.DISAGREE_FOR then
        return true, "probe-up"
    end
    return false, "down"
end

-- Rounded to ms so a record survives encode/decode unchanged (tests compare them).
function M.ms(t)
    return floor(t * 1000 + 0.5) / 1000
end

-- $upstream_status's LAST attempt as a number: nil when that attempt has none ("502, -": the retry got no
-- status, the client left first) or there was none. An earlier attempt's status is not this peer's.
function M.last_status(text)
    return tonumber((text or ""):match("([^%s,:]+)%s*$"))
end

return M
