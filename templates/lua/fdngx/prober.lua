-- fdngx.prober: the balancer's active /health probes (fdngx.balancer starts them from its tick, through
-- fdngx.pool.probes), and what a probe's result is said as. ngx is read only inside the functions that run in
-- nginx: M.news is pure, for luajit tests.

local health = require("fdngx.health")
local pool_mod = require("fdngx.pool")
local store = require("fdngx.store")
local slots = require("fdngx.slots")

local M = {}

local min, format = math.min, string.format

local PROBE_TIMEOUT_MS = 500 -- each of a probe's steps, within its whole deadline (fdngx.pool.PROBE_DEADLINE)
-- A worker's probes running at once, at most: far below lua_max_running_timers (256 by default), which the
-- balancer's own tick timer needs too (nginx drops a timer past it). Peers waiting wait for a later tick.
M.MAX_PROBES = 32

local probing = slots.new(M.MAX_PROBES, pool_mod.PROBE_HOLD) -- this worker's probes running

-- GET /health of addr:port: true on a 200. One deadline for the whole exchange (fdngx.pool.PROBE_DEADLINE):
-- a peer that accepts and then sends nothing, or a byte at a time, ends it there (each read's own timeout
-- starts again with every byte). Only the status line's first 12 bytes are read ("HTTP/1.1 200").
local function get_health(addr, port)
    local sock = ngx.socket.tcp()
    sock:settimeouts(PROBE_TIMEOUT_MS, PROBE_TIMEOUT_MS, PROBE_TIMEOUT_MS)
    local deadline = ngx.now() + pool_mod.PROBE_DEADLINE
    if not sock:connect(addr, port) then return false end
    local got = sock:send("GET /health HTTP/1.1\r\nHost: " .. addr .. ":" .. port
                          .. "\r\nUser-Agent: fdngx-balancer\r\nConnection: close\r\n\r\n") and ""
    while got and #got < 12 do
        ngx.update_time()
        local left = deadline - ngx.now()
        if left <= 0 then got = nil break end
        sock:settimeout(min(PROBE_TIMEOUT_MS, left * 1000))
        local data = sock:receiveany(12 - #got)
        got = data and got .. data
    end
    sock:close()
    return got ~= nil and got:match("^HTTP/%d%.%d (%d%d%d)") == "200"
end

-- What a probe of `name` changed in the picks, for the error log, or nil (nothing): `was`, `now_state` are
-- fdngx.health.usable's states before and after; `age`: seconds since the snapshot in force was pushed;
-- `hold`: its silence (fdngx.store.hold: SILENT_AFTER, or three of its pusher's intervals).
-- Each line says what will happen next, not only what just did: a peer the sidecar holds down is back only
-- for DISAGREE_FOR while the sidecar is heard, and then its down wins again, silently.
function M.news(name, was, now_state, age, hold)
    local before = was == "up" or was == "probe-up" or was == "own-up"
    local after = now_state == "up" or now_state == "probe-up" or now_state == "own-up"
    if before == after then return nil end
    if not after then
        return format("fdngx: %s fails /health again: out of new picks while it does", name)
    end
    if now_state == "probe-up" then
        return format("fdngx: %s answers /health 200 again: back in picks for up to %.0f s, though the last push "
                      .. "says it is down: unless a push says up by then, or pushes stop, that down holds it out again",
                      name, health.DISAGREE_FOR)
    end
    if now_state == "own-up" then
        return format("fdngx: %s answers /health 200 again: back in picks (the push that says it is down is %.0f s "
                      .. "old: no push for over %.0f s, this frontend's own health checks decide)", name, age,
                      hold or store.SILENT_AFTER)
    end
    return format("fdngx: %s answers /health 200 again: back in picks", name)
end

local function state_of(pool, name, now)
    local p = pool.by_name and pool.by_name[name]
    if not p then return nil end
    local _, state = health.usable(p.h, p.down, p.s_at, now, pool_mod.silent(pool, now))
    return state
end

local function probe(premature, pool, name, addr, port)
    local slot = pool.name .. " " .. name
    if premature then
        probing:give(slot)
        return pool_mod.probed(pool, name)
    end
    local ok, good = pcall(get_health, addr, port)
    probing:give(slot)
    pool_mod.probed(pool, name)
    good = ok and good
    local now = ngx.now()
    pool_mod.sync(pool, now)
    local was = state_of(pool, name, now)
    local p = pool.by_name and pool.by_name[name]
    local down = p ~= nil and p.down
    -- removed or moved meanwhile: no record (pool.mark asks the snapshot in force)
    local h = pool_mod.mark(pool, name, function(rec, t) return health.on_probe(rec, good, t, down) end, now, addr,
                            port)
    if not h or not was then return end
    local said = M.news(name, was, state_of(pool, name, now), now - (pool.snap_at or now), pool.hold)
    if said then ngx.log(ngx.WARN, said) end
end

-- Start a probe of peer `p` (fdngx.pool.probes' `start`): true, or nil and why not.
function M.start(pool, p)
    local now = ngx.now()
    if probing:full(now) then
        return nil, M.MAX_PROBES .. " probes of this worker still running (replicas that accept and do not answer?)"
    end
    local ok, err = ngx.timer.at(0, probe, pool, p.name, p.addr, p.port)
    if not ok then return nil, err == "process exiting" and err or tostring(err) .. " (lua_max_pending_timers?)" end
    probing:take(pool.name .. " " .. p.name, now)
    return ok
end

return M
