-- fdngx.admin: the loopback-only, token-protected admin location (content_by_lua).
--
-- POST: a whole snapshot (fdngx.peers format: generation + every peer with weight, down, capacity and
-- scraped load). All or nothing: the body is validated completely before anything is applied.
--   200 "ok generation=G peers=N added=a,b removed=c"   applied (added/removed: membership changes)
--   200 "unchanged generation=G peers=N"                 the same snapshot again (a retry): nothing to do
--   400 "line K: <reason>"                               malformed: nothing applied
--   400 "generation G is S s ahead of this frontend's clock ..."   more than fdngx.store.FUTURE_MS ahead: a
--                                                        pusher's clock is wrong; refused, nothing applied
--   409 "stale generation=G current=C"                   older than the one in force (another controller
--                                                        pushed a newer one), or of the same generation with
--                                                        other bytes that sort first (fdngx.store.verdict):
--                                                        refused, nothing applied.
--                                                        A generation in force that is itself that far ahead
--                                                        is replaced (WARN), never a wedge; one not pushed
--                                                        again for fdngx.store.SILENT_AFTER gives way to an
--                                                        older one (its pusher went silent: WARN).
--   409 "snapshot for upstream A; this frontend's pool is B ..."   pushed to a frontend of another upstream
--                                                        (a push file that lists it by mistake): nothing
--                                                        applied. A snapshot naming no upstream (an fdngx
--                                                        0.3.0 before 2026-12-07) is taken unchecked.
--   507 "shared dict fdngx_<pool> is full ..."          no room for it: nothing applied, the snapshot in force
--                                                        stays (raise lua_shared_dict's size: --lua-dict-size)
--   403 bad or missing X-Fdngx-Token; 413 body too large; 405 other methods
-- GET: the balancer's view, key=value: the pool (generation, age, peers, mode, dict_free and dict_size: the
-- shared dict's free pages and size in bytes, silent: 1 when no push came for fdngx.store.SILENT_AFTER), then
-- one line per peer (health: fdngx.health.usable's state) (for tests, and operators' curl).

local peers = require("fdngx.peers")
local pool_mod = require("fdngx.pool")
local store = require("fdngx.store")
local pick = require("fdngx.pick")
local health = require("fdngx.health")
local bit = require("bit")

local M = {}

local format, concat, byte = string.format, table.concat, string.byte

-- Compare in time independent of where the first difference is.
local function same(a, b)
    if type(a) ~= "string" or #a ~= #b then return false end
    local diff = 0
    for i = 1, #a do diff = bit.bor(diff, bit.bxor(byte(a, i), byte(b, i))) end
    return diff == 0
end

local function answer(status, text)
    ngx.status = status
    ngx.header["Content-Type"] = "text/plain"
    ngx.say(text)
    return ngx.exit(status)
end

-- One install at a time: pushes, and init_by_lua at a reload (fdngx.balancer.init), while old workers still
-- take pushes. Its expiry frees it from a worker killed holding it.
M.LOCK, M.LOCK_TTL = "adm:lock", 5

local function locked(pool, fn)
    local dict = pool.dict
    for _ = 1, 400 do
        local took, err = dict:safe_add(M.LOCK, true, M.LOCK_TTL)
        if took then
            local ok, a, b = pcall(fn)
            dict:delete(M.LOCK)
            if not ok then error(a) end
            return a, b
        end
        -- no room for the lock's key: a full dict, which has no room for the push either
        if err ~= "exists" then return 507, pool_mod.full(pool, err) end
        ngx.sleep(0.005)
    end
    return 503, "busy: another push holds the admin lock"
end

-- Why a snapshot of generation `gen` goes in although the one in force (`current`) is newer or of the same
-- generation (fdngx.store.verdict), for the error log; nil for a plain newer one.
local function why_in(verdict, pool, current, gen, now, quiet)
    local name = "fdngx: pool " .. pool.name .. ": "
    if verdict == "tie" then
        return ngx.INFO, format("%sgeneration %d pushed twice with other bytes (two pushers in one millisecond): "
                                .. "the bytes that sort last are kept, on every frontend alike", name, gen)
    end
    if verdict == "taken" then
        return ngx.WARN, format("%sgeneration %d in force was not pushed again for %.0f s (its pusher went silent): "
                                .. "replaced by the older generation %d, %.1f s older, of another pusher", name,
                                current, quiet, gen, (current - gen) / 1000)
    end
    if current and current > gen then
        return ngx.WARN, format("%sgeneration %d in force was %.0f s ahead of this clock; replaced by %d", name,
                                current, current / 1000 - now, gen)
    end
end

local function post(pool)
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body == nil and ngx.req.get_body_file() then
        return 413, "body larger than the admin's client_body_buffer_size"
    end
    local snap, err = peers.parse(body or "")
    if not snap then return 400, err .. " (nothing applied)" end
    if snap.upstream and snap.upstream ~= pool.name then
        return 409, format("snapshot for upstream %s; this frontend's pool is %s (nothing applied): "
                           .. "does the push file of upstream %s list a frontend of %s"
                           .. ", or was this frontend rendered from an inventory with another upstream name?",
                           snap.upstream, pool.name, snap.upstream, pool.name)
    end
    local dict = pool.dict
    return locked(pool, function()
        ngx.update_time()
        local now = ngx.now()
        local current = dict:get("gen")
        local at, order = dict:get("snap_at"), nil
        if current == snap.generation then order = store.order(body, (store.text(dict))) end
        local verdict = store.verdict(current, snap.generation, now, at and now - at, order, store.hold(dict))
        if verdict == "future" then
            return 400, format("generation %d is %.0f s ahead of this frontend's clock (at most %d s): the pusher's "
                               .. "clock, or this frontend's, is wrong (nothing applied)", snap.generation,
                               snap.generation / 1000 - now, store.FUTURE_MS / 1000)
        end
        if verdict == "stale" then
            return 409, format("stale generation=%d current=%d (nothing applied)", snap.generation, current)
        end
        if verdict == "unchanged" then
            return 200, format("unchanged generation=%d peers=%d", current, #snap.peers)
        end
        local level, why = why_in(verdict, pool, current, snap.generation, now, at and now - at)
        local added, removed, quiet = pool_mod.install(pool, body, snap, now)
        if not added then
            ngx.log(ngx.ERR, "fdngx: pool ", pool.name, " generation ", format("%d", snap.generation), ": ", removed)
            return quiet == "full" and 507 or 500, removed
        end
        if why then ngx.log(level, why) end
        if quiet then
            ngx.log(ngx.WARN, "fdngx: pool ", pool.name, ": a push again, after ", format("%.0f", quiet), " s without ",
                    "one: its down flags hold replicas out again")
        end
        ngx.log(ngx.INFO, "fdngx: pool ", pool.name, " generation ", format("%d", snap.generation), ": ", #snap.peers,
                " peer(s), added ", #added, ", removed ", #removed)
        return 200, format("ok generation=%d peers=%d added=%s removed=%s", snap.generation, #snap.peers,
                           concat(added, ","), concat(removed, ","))
    end)
end

local function view(pool)
    local now = ngx.now()
    pool_mod.sync(pool, now)
    -- the shared dict's room (--lua-dict-size): bytes of free pages, and the zone's size
    local dict = pool.dict
    local free = dict.free_space and dict:free_space() or -1
    local size = dict.capacity and dict:capacity() or -1
    local silent = pool_mod.silent(pool, now)
    local lines = { format("generation=%d age=%.3f peers=%d mode=%s dict_free=%d dict_size=%d silent=%d frontends=%d",
                           pool.gen or -1, now - (pool.snap_at or now), #pool.peers, pool.mode, free, size,
                           silent and 1 or 0, pool.frontends or 1) }
    for _, p in ipairs(pool.peers) do
        local inflight = pool.ledger:inflight(p.name)
        local ext = pick.faded(p.ext, pool.snap_at, now)
        local _, state = health.usable(p.h, p.down, p.s_at, now, silent)
        local load = pool_mod.load(pool, p, inflight, now) -- what a pick counts: own + others'
        lines[#lines + 1] = format(
            "peer=%s addr=%s:%d weight=%d down=%d capacity=%d inflight=%d ext=%.3f others=%d score=%.4f "
            .. "per_slot=%.3f health=%s level=%d", p.name, p.addr, p.port, p.weight, p.down and 1 or 0, p.capacity,
            inflight, ext, load - inflight, pick.score(p, load), load / p.capacity, state, p.h.level)
    end
    return 200, concat(lines, "\n")
end

function M.handle(pool)
    if not same(ngx.var.http_x_fdngx_token, pool.token) then
        return answer(403, "bad or missing X-Fdngx-Token")
    end
    local method = ngx.req.get_method()
    if method == "POST" then return answer(post(pool)) end
    if method == "GET" then return answer(view(pool)) end
    return answer(405, "GET or POST")
end

return M
