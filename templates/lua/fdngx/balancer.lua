-- fdngx.balancer: the OpenResty flavor's balancer_by_lua (works with OpenResty and with Debian's nginx +
-- libnginx-mod-http-lua + lua-resty-core). Loaded with require() through lua_package_path; the config
-- passes it constants only (pool and dict names, file paths, mode), through fdngx's Lua escaping.
--
-- Data flow:
--   fdngx render writes the peers file (.<config>.fdngx-peers: every replica's name, address, weight,
--   capacity) beside the config  ->  init_by_lua (master, at start and reload) validates it with
--   fdngx.peers and installs it in the shared dict unless a newer push is already there (the dict
--   survives reloads)  ->  the sidecar (or cron) POSTs whole snapshots to the admin location
--   (fdngx.admin), newest generation wins, no reload, membership changes included  ->  each worker keeps
--   a parsed copy (fdngx.pool.sync), refreshed by a 0.1 s timer and on the next request after a change.
--
-- Per request: one shared-dict read of `ver`, one of each candidate's in-flight count, the pick
-- (fdngx.pick: least (in flight + external load) / capacity-carrying weight, or p2c), and two increments
-- (fdngx.ledger). The attempt's end (a retry, or the log phase) releases it and feeds fdngx.health: a
-- connect error or a 502/503/504 takes the peer out at once, a timer's /health probe brings it back.
--
-- Per-request state is kept by $request_id in a worker-local table, not in ngx.ctx, because ngx.ctx is
-- dropped by an internal redirect (error_page): the open attempt would then never be released.

local ngx_balancer = require("ngx.balancer")
local ffi = require("ffi")
local peers = require("fdngx.peers")
local pick = require("fdngx.pick")
local health = require("fdngx.health")
local ledger = require("fdngx.ledger")
local pool_mod = require("fdngx.pool")
local store = require("fdngx.store")
local admin = require("fdngx.admin")
local prober = require("fdngx.prober")

pcall(ffi.cdef, "int kill(int pid, int sig);")
pcall(ffi.cdef, "long sysconf(int name);")

local M = {}

local TICK = 0.1 -- seconds between a worker's timer runs (sync, probes, lease, reaping)
local WARN_EVERY = 10 -- seconds between two of a worker's warnings of one kind (a probe that could not
                      -- start, a full dict, a snapshot it cannot read)
local ESRCH = 3
local NGX_BUSY = -3 -- ngx_core.h
-- A response with one of these statuses means the peer is broken, not merely full (429) or failing one
-- request (500): nginx never answers them itself for a peer that did answer.
local FAILS = { [502] = true, [503] = true, [504] = true }

local pools = {} -- name -> pool: built by init() in the master, inherited by every worker
local open = {} -- $request_id -> { pool, peer, tried }: this worker's balanced requests in flight
local warn_at = {} -- kind -> when this worker may next warn of it

-- Log `...` at `level` unless this worker logged the same `kind` less than WARN_EVERY ago.
local function warn_once(kind, level, now, ...)
    if now < (warn_at[kind] or 0) then return end
    warn_at[kind] = now + WARN_EVERY
    ngx.log(level, ...)
end

local now_of, min, floor = ngx.now, math.min, math.floor

local function read_file(path, what, limit)
    local fh, err = io.open(path, "rb")
    if not fh then error("fdngx: cannot read the " .. what .. " " .. path .. ": " .. tostring(err), 0) end
    local data = fh:read(limit + 1) or ""
    fh:close()
    if #data > limit then error("fdngx: the " .. what .. " " .. path .. " is larger than " .. limit .. " bytes", 0) end
    return data
end

-- Up to `limit` bytes of a small system file (/proc), or nil.
local function read_small(path, limit)
    local fh = io.open(path, "rb")
    if not fh then return nil end
    local data = fh:read(limit)
    fh:close()
    return data
end

-- init_by_lua: cfg = { pool, dict, token_file, peers_file, mode } (constants from the config).
function M.init(cfg)
    for _, k in ipairs({ "pool", "dict", "token_file", "peers_file", "mode" }) do
        if type(cfg[k]) ~= "string" then error("fdngx: init needs the string " .. k, 0) end
    end
    local dict = ngx.shared[cfg.dict]
    if not dict then error("fdngx: lua_shared_dict " .. cfg.dict .. " is missing", 0) end
    -- The token stays out of the (world-readable) config: read from its 0600 file by the master.
    local token = read_file(cfg.token_file, "admin token file", 4096):match("^([^\r\n]*)")
    if #token < 16 then error("fdngx: the admin token in " .. cfg.token_file .. " is shorter than 16 characters", 0) end
    local text = read_file(cfg.peers_file, "peers file", peers.MAX_BYTES)
    local snap, err = peers.parse(text)
    if not snap then error("fdngx: peers file " .. cfg.peers_file .. ": " .. err, 0) end
    if snap.upstream and snap.upstream ~= cfg.pool then
        error("fdngx: peers file " .. cfg.peers_file .. " is for upstream " .. snap.upstream .. ", this config's is "
              .. cfg.pool .. " (render the config and its peers file from one inventory)", 0)
    end
    local pool = { name = cfg.pool, zone = cfg.dict, dict = dict, token = token,
                   mode = cfg.mode == "p2c" and "p2c" or "least", busy_var = cfg.busy_var, peers = {}, by_name = {},
                   scratch = {} }
    -- The dict survives a reload: keep what a newer push put there, unless it is unreadable (an older
    -- fdngx's layout after an upgrade). The generations' rule is a push's (fdngx.pool.verdict): one in force
    -- more than FUTURE_MS ahead of this clock gives way to the file's, and a file's that far ahead never
    -- replaces a valid one; at a first start it is all there is, and the next valid push replaces it.
    -- At a reload the old workers still serve pushes: the admin's lock keeps one from landing between this
    -- read and the install below (a push answered "ok", then replaced by the older file). Held by a push in
    -- progress (or by a worker killed in one, for its 5 s): that push decides, and the file waits for the
    -- next (the sidecar pushes a whole snapshot every cycle).
    local took, lerr = dict:safe_add(admin.LOCK, true, admin.LOCK_TTL)
    if not took then
        if lerr == "exists" then
            ngx.log(ngx.WARN, "fdngx: pool ", cfg.pool, ": a push is being applied; the peers file ",
                    cfg.peers_file, " is left to the next one")
        else
            ngx.log(ngx.ERR, "fdngx: pool ", cfg.pool, ": peers file ", cfg.peers_file, ": ",
                    pool_mod.full(pool, lerr, "not installed"))
        end
        pools[cfg.pool] = pool
        return
    end
    local ok, ierr = pcall(M.install_file, pool, cfg, text, snap)
    dict:delete(admin.LOCK)
    if not ok then error(ierr, 0) end
    pools[cfg.pool] = pool
end

-- init's part under the admin lock: install the peers file's snapshot unless the dict's is newer. Its data is
-- as old as its generation (fdngx.store.data_at): a peers file of last week holds no replica down (its pusher,
-- the render, is long gone: fdngx.health.usable), one written a moment ago (a render --reload) does.
function M.install_file(pool, cfg, text, snap)
    local dict = pool.dict
    local current = peers.parse((pool_mod.text(dict)))
    ngx.update_time()
    local now = now_of()
    local verdict = current and pool_mod.verdict(current.generation, snap.generation, now)
    local function gen_ahead(gen)
        return string.format("%d, %.0f s ahead of this clock", gen, gen / 1000 - now)
    end
    local said = "fdngx: pool " .. cfg.pool .. ": "
    if not current or verdict == "ok" then
        if current and current.generation > snap.generation then
            ngx.log(ngx.WARN, said, "generation ", gen_ahead(current.generation), ", in force; replaced by the ",
                    "peers file's ", string.format("%d", snap.generation))
        elseif pool_mod.verdict(nil, snap.generation, now) == "future" then
            ngx.log(ngx.WARN, said, "the peers file's generation ", gen_ahead(snap.generation), " (written by a ",
                    "clock that was wrong): in force until the next push replaces it")
        end
        local added, ierr = pool_mod.install(pool, text, snap, now, store.data_at(snap.generation, now, false))
        if not added then error("fdngx: peers file " .. cfg.peers_file .. ": " .. ierr, 0) end
    elseif verdict == "future" then
        ngx.log(ngx.WARN, said, "the peers file's generation ", gen_ahead(snap.generation), " (written by a clock ",
                "that was wrong): ignored, generation ", string.format("%d", current.generation), " kept")
    end
end

local SC_CLK_TCK = 2 -- <bits/confname.h>

-- The boot time (/proc/stat's btime) and clock ticks per second, read once per worker; nil where there is no
-- /proc (the reaper then asks kill(pid, 0) alone).
local boot = nil
local function boot_clock()
    if boot == nil then
        local text = read_small("/proc/stat", 65536)
        local btime = text and tonumber(text:match("\nbtime (%d+)"))
        local ok, hz = pcall(function() return tonumber(ffi.C.sysconf(SC_CLK_TCK)) end)
        boot = { btime = btime, hz = ok and hz or nil }
    end
    return boot.btime, boot.hz
end

-- Does worker `pid`, up since `since` (seconds since the epoch), still live? Its pid may be another
-- process's by now (fdngx.ledger.REUSED_AFTER).
local function pid_alive(pid, since)
    if not pid then return false end
    if ffi.C.kill(pid, 0) ~= 0 and ffi.errno() == ESRCH then return false end -- EPERM: it exists, as another user
    local started = since and ledger.started_at(read_small("/proc/" .. pid .. "/stat", 4096), boot_clock())
    return not (started and started > since + ledger.REUSED_AFTER)
end

-- What nginx's last failure code says: a connection error or timeout comes as 502 / 504, like an answer.
local FAILURE = {
    [502] = "failed (no connection, or a 502 answer)",
    [504] = "failed (timed out, or a 504 answer)",
}

-- `addr`, `port`: where the request went (a push may have moved the name to another server since).
local function failed(pool, name, now, why, addr, port)
    local h, moved = pool_mod.mark(pool, name, health.on_failure, now, addr, port)
    if moved then
        ngx.log(ngx.WARN, "fdngx: ", name, " ", why, ": out of new picks for ", string.format("%.1f", h.till - now),
                " s, or until its /health answers 200")
    end
end

-- A probe that cannot start is tried again at the next tick (fdngx.pool.probes): warn, but not 10 times a
-- second for as long as it lasts. An exiting worker's refusal is no news.
local function warn_unprobed(name, err, now)
    if err == "process exiting" then return end
    warn_once("probe", ngx.WARN, now, "fdngx: could not schedule the /health probe of ", name, ": ", err)
end

local function tick(premature, pool)
    if premature then return end -- the worker is exiting: its lease lapses, its pid keeps its counts
    local now = now_of()
    local ok, err = pool_mod.sync(pool, now)
    if ok == nil then warn_once("sync", ngx.ERR, now, "fdngx: pool ", pool.name, ": ", err, " (the copy in use stays)") end
    local dict = pool.dict
    local missed, why = pool_mod.probes(pool, now, prober.start)
    if missed then warn_unprobed(missed, why, now) end
    if now >= pool.renew_at then
        if not pool.ledger:renew() then
            warn_once("full", ngx.ERR, now, "fdngx: ", pool_mod.full(pool, "no memory",
                      "this worker's lease not renewed (its pid still says it lives)"))
        end
        pool.renew_at = now + ledger.RENEW_EVERY
    end
    if now >= pool.reap_at then
        pool.reap_at = now + ledger.REAP_EVERY
        if dict:safe_add("reap", true, ledger.REAP_EVERY * 0.9) then
            local keys = dict:get_keys(0)
            local taken, workers = ledger.reap(dict, pid_alive, keys)
            if taken ~= 0 then
                ngx.log(ngx.WARN, "fdngx: took back ", taken, " in-flight request(s) of ", workers, " dead worker(s)")
            end
            pool_mod.sweep(pool, now, keys) -- after the reaping: a dead worker's requests no longer count
            local quiet = store.went_quiet(dict, now) -- one worker at a time (the reaper's lock)
            if quiet then
                ngx.log(ngx.WARN, "fdngx: pool ", pool.name, ": no snapshot for ", string.format("%.0f", quiet),
                        " s: the frontend's own health checks decide (the last push's down flags no longer hold ",
                        "replicas out; its weights and membership stay; said again when a push arrives)")
            end
        end
    end
end

function M.init_worker()
    local ok, process = pcall(require, "ngx.process")
    -- A worker, or nginx's one process under `master_process off` ("single"); not a cache manager or loader.
    local kind = ok and process.type() or "worker"
    if kind ~= "worker" and kind ~= "single" then return end
    local now, pid = now_of(), ngx.worker.pid()
    -- Each worker its own random sequence: otherwise every worker makes the same tie-breaks and p2c draws.
    math.randomseed(floor(now * 1000) + pid)
    for _, pool in pairs(pools) do
        pool.ledger = ledger.new(pool.dict, ledger.worker_id(pid, now))
        pool.ledger:renew()
        pool.renew_at, pool.reap_at = now + ledger.RENEW_EVERY, now + ledger.REAP_EVERY
        local synced, err = pool_mod.sync(pool, now, true)
        if synced == nil then ngx.log(ngx.ERR, "fdngx: ", err) end
        -- One closure pair per pool, reading the request's time from the pool: no allocation per request.
        pool.usable = function(p) return (health.usable(p.h, p.down, p.s_at, pool.now, pool.silent)) end
        pool.not_out = function(p) return not health.balancer_out(p.h, pool.now) end
        local dict = pool.dict
        pool.load = function(p)
            local n = dict:get(p.ikey)
            n = n and n > 0 and n or 0
            return pool_mod.load(pool, p, n, pool.now)
        end
        local started, terr = ngx.timer.every(TICK, tick, pool)
        if not started then ngx.log(ngx.ERR, "fdngx: cannot start the balancer timer: ", terr) end
    end
end

-- balancer_by_lua: pick the peer for this attempt (the first, or a retry after a failure).
function M.balance(name)
    local pool = pools[name]
    local now = now_of()
    pool.now = now
    pool_mod.sync(pool, now)
    pool.silent = pool_mod.silent(pool, now)
    local rid = ngx.var.request_id
    local st = open[rid]
    local full = false -- the attempt before was answered 429: a retry goes only to a usable peer, no fail-open
    if st and st.peer then
        -- nginx is retrying (connection error, 429/502/503/504): the previous peer no longer holds this
        -- request; its failure counts against its health unless it only said "full" (429). nginx reports
        -- every status but 403/404 as "failed" (ngx_http_upstream_next: NGX_PEER_FAILED), 429 included.
        -- So a 500 counts here but not in the log phase, by design: nginx retries, and reports as failed,
        -- exactly what proxy_next_upstream lists (http_500 only where a hand-written location asks for it;
        -- fdngx renders error http_429 http_503); the log phase sees any last status and counts FAILS only.
        local state, code = ngx_balancer.get_last_failure()
        full = code == 429
        if FAILS[code] or (state == "failed" and code ~= 429) then
            failed(pool, st.peer, now, FAILURE[code] or ("failed (" .. (code and "HTTP " .. code or state) .. ")"),
                   st.addr, st.port)
        end
        if st.counted then pool.ledger:release(st.peer) end
        st.tried[st.peer] = true
        st.peer = nil
    elseif not st then
        st = { pool = pool, tried = {} }
        open[rid] = st
        local more = min(#pool.peers - 1, 2)
        if more > 0 then ngx_balancer.set_more_tries(more) end
    end
    local p = pick.choose(pool.mode, pool.peers, st.tried, pool.usable, pool.load, math.random, pool.scratch,
                          not full and pool.not_out or nil)
    if not p then
        open[rid] = nil
        -- Nothing to try: every peer tried, out by the balancer's own evidence (a failed request or probe:
        -- a guess there would fail again, or wait for a connect timeout), or none usable after a 429. The
        -- site's error page answers nginx's 502 as 503 + Retry-After ("every replica busy or failing")
        -- through this variable, as after nginx's own "no live upstreams"; --mode upstream renders no
        -- location to set it in (the sysadmin's location gets the 502).
        if pool.busy_var then ngx.var[pool.busy_var] = "1" end
        -- No peer left to try, or none at all (none registered yet): NGX_BUSY, nginx's own "no live
        -- upstreams", which the site answers as 503 + Retry-After like the plain flavor (lua-nginx-module
        -- passes only NGX_ERROR, NGX_BUSY and NGX_DECLINED through from here; a status would become a 500).
        return ngx.exit(NGX_BUSY)
    end
    st.peer, st.addr, st.port = p.name, p.addr, p.port
    st.counted = pool.ledger:acquire(p.name)
    if not st.counted then
        warn_once("full", ngx.ERR, now, "fdngx: ", pool_mod.full(pool, "no memory",
                  "a request to " .. p.name .. " goes uncounted in the picks"))
    end
    local ok, err = ngx_balancer.set_current_peer(p.addr, p.port)
    if not ok then
        ngx.log(ngx.ERR, "fdngx: set_current_peer ", p.addr, ":", p.port, " failed: ", err)
        return ngx.exit(500)
    end
end

-- log_by_lua (http level): the request is over; release its attempt and learn from its status.
function M.log()
    if next(open) == nil then return end -- nothing balanced is open in this worker: not one of ours
    local rid = ngx.var.request_id
    local st = open[rid]
    if not st then return end
    open[rid] = nil
    local name, pool, counted = st.peer, st.pool, st.counted
    if not name then return end
    local now = now_of()
    -- The LAST attempt's status only ("502, -": the retry got no status, the client left first; "-" is none).
    local code = health.last_status(ngx.var.upstream_status)
    -- Before a health mark only (not on every request): the current snapshot, so that a peer a push removed
    -- meanwhile gets no record (fdngx.pool.mark).
    if code and FAILS[code] then
        pool_mod.sync(pool, now)
        failed(pool, name, now, "answered " .. code, st.addr, st.port)
    elseif code then
        local p = pool.by_name[name]
        if p and p.h and (p.h.level > 0 or p.h.out) then
            pool_mod.sync(pool, now)
            pool_mod.mark(pool, name, health.on_success, now, st.addr, st.port)
        end
    end
    if counted then pool.ledger:release(name) end
end

function M.admin(name)
    return admin.handle(pools[name])
end

return M
