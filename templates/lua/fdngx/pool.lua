-- fdngx.pool: one upstream's state in the shared dict, and each worker's copy of it (no ngx here: the
-- dict and the clock are passed in, so luajit tests drive it with a fake dict).
--
-- Shared dict layout (lua_shared_dict fdngx_<upstream>; it survives reloads, not restarts):
--   gen         the generation in force: a push must carry a newer one to replace it (fdngx.store.verdict)
--   snap:<id>   its snapshot text, exactly as validated (fdngx.peers); a key per snapshot (fdngx.store.id),
--               written before `gen` (or `tie`) moves to it and the old one deleted after (M.install: a full
--               dict refuses a push whole)
--   snap_at     when its data is from (ages the external load; silences: fdngx.store.SILENT_AFTER)
--   tie, quiet  fdngx.store's
--   ver         bumped after every install and every change of a health record the workers read (not
--               after a probe that changes nothing); workers compare this one number per request and
--               re-read the rest only when it moves
--   x:<peer>    external load at install: the pushed load minus this nginx's own in flight then, smoothed
--               across pushes (M.SMOOTH), signed (below 0 counts as 0 in the picks)
--   ip:<peer>   this nginx's own in flight on the peer at install: its change since counts F - 1 times for
--               the other frontends of the snapshot's `frontends` (fdngx.pick.others)
--   sa:<peer>   when the sidecar's `down` last changed for the peer (fdngx.health's disagreement rule)
--   h:<peer>    the balancer's own health record (fdngx.health.encode)
--   rm:<peer>   since when the peer is out of the snapshot in force: its i: total goes once no request is
--               open on it (M.sweep)
--   i:, o:, alive:   in-flight counters (fdngx.ledger); pl:<peer>, pr:<peer>, reap, adm: locks
--
-- Every write here and in fdngx.ledger is a safe_* one, or in place (a number over a number): nginx's plain
-- set/incr make room in a full dict by evicting the least recently used keys, and those are the counters
-- of the longest requests still open (an evicted share never comes down again) or the snapshot in force.
-- A full dict refuses instead (M.full says so, naming the zone), and what was there stays.
--
-- Per worker, `pool.peers` is a parsed copy (weights, down, capacity, external load, health) refreshed by
-- sync(): on a timer, and on the next request after `ver` moves. Picking a peer then costs one shared-dict
-- read per candidate (its in-flight count) plus one for `ver`.

local peers = require("fdngx.peers")
local health = require("fdngx.health")
local pick = require("fdngx.pick")
local store = require("fdngx.store")

local M = {}

local max, exp = math.max, math.exp

-- External load is smoothed across pushes with this time constant (seconds). What other frontends have in
-- flight on a peer swings from push to push as they balance against each other: taken whole, every frontend
-- corrects the same swing at once (N frontends, N times too much: a ping-pong). Load nothing here balances
-- (clients that go to a replica directly) persists, and comes through the smoothing whole within seconds.
-- Measured (bench.lb, 20 s windows, same seeds, before -> after): p99 TTFT with 25 % of requests going to
-- one replica directly 289 -> 234 ms (oracle 226); a half-speed replica, legacy metrics, 348 -> 301 ms.
M.SMOOTH = 2.0

-- The rules of the snapshot in force live in fdngx.store; here under their old names too.
M.FUTURE_MS, M.SILENT_AFTER, M.verdict, M.text = store.FUTURE_MS, store.SILENT_AFTER, store.verdict, store.text

-- What a pick counts on peer p at `now`, given this nginx's own in flight there (`own`, all workers): the own
-- plus the others' (fdngx.pick.others: the pushed external load, and with `frontends N` the other frontends'
-- requests since the push). The balancer ranks by it; the admin view shows it.
function M.load(pool, p, own, now)
    return own + pick.others(p.ext, own, p.at_push, pool.frontends, pool.snap_at, now)
end

-- Whether this worker's copy is of a snapshot pushed more than SILENT_AFTER ago at `now`: its pusher went
-- silent, and its `down` flags no longer hold peers out (fdngx.health.usable).
function M.silent(pool, now)
    return pool.snap_at ~= nil and now - pool.snap_at >= (pool.hold or store.SILENT_AFTER)
end

-- The words for a write a full dict refused (err: nginx's "no memory"), and what came of it.
function M.full(pool, err, outcome)
    local free = pool.dict.free_space and pool.dict:free_space()
    local hint = "raise its size (lua_shared_dict, fdngx render --lua-dict-size)"
    return string.format("shared dict %s is full (%s%s): %s; %s", pool.zone or ("fdngx_" .. pool.name),
                         tostring(err), free and string.format(", %d bytes free", free) or "",
                         outcome or "nothing applied", hint)
end

-- Set `key` without evicting anything (safe_set); nil and the error when the dict has no room.
local function put(dict, key, value)
    local ok, err = dict:safe_set(key, value)
    if ok then return true end
    return nil, err
end

-- The snapshot in force, parsed: this worker's copy when it is of the generation in force (no second parse of
-- a 1,000-peer text on every push), else parsed from the dict.
local function in_force(pool, dict)
    if pool.by_name and pool.id ~= nil and pool.id == store.id(dict) then
        return { peers = pool.peers, by_name = pool.by_name }
    end
    return peers.parse(store.text(dict))
end

-- Make `snap` (parsed from `text`) the one in force. The caller holds the admin lock (or is init_by_lua,
-- with it). `at`: when its data is from (fdngx.store.data_at; default `now`, a push). Returns the names added
-- and removed, and how long the snapshot it replaces had been said to be silent (fdngx.store.heard, or nil);
-- or nil, an error and "full" when the dict has no room: the snapshot in force then stays, whole (its text is
-- never overwritten: a new key per snapshot), and so does every counter (nothing is evicted).
-- A snapshot of the generation in force (fdngx.store.verdict's "tie") goes in under the next tie's id.
function M.install(pool, text, snap, now, at)
    local dict = pool.dict
    local current = store.id(dict)
    local old = in_force(pool, dict)
    local id = store.next_id(current, snap.generation)
    local key = store.key(id)
    local ok, err = put(dict, key, text)
    if not ok then return nil, M.full(pool, err), "full" end
    local written, snap_at = {}, dict:get("snap_at") -- keys of peers not in force, written below
    local put_at = dict:get("put_at") or snap_at
    local function refused(why)
        -- what this push wrote goes (a peer in force keeps its estimate moved part-way: smoothed anyway)
        if key ~= (current and store.key(current)) then dict:delete(key) end
        for _, k in ipairs(written) do dict:delete(k) end
        if snap_at then dict:safe_set("snap_at", snap_at) end
        if put_at then dict:safe_set("put_at", put_at) end
        return nil, M.full(pool, why), "full"
    end
    -- the part of the previous estimate kept: none after a long gap (it faded out in the picks meanwhile)
    local dt = now - (dict:get("snap_at") or now - pick.STALE_AFTER)
    local keep = (dt > 0 and dt < pick.STALE_AFTER) and exp(-dt / M.SMOOTH) or 0
    local fresh = {} -- names whose health record goes: a server moved, removed, or (re-)added
    for _, p in ipairs(snap.peers) do
        local inflight = max(0, dict:get("i:" .. p.name) or 0)
        -- Signed: the load was scraped a moment before this push, so a request of this nginx's that ended in
        -- between counts +1 here and one that started counts -1. Clamping each push at 0 turned that
        -- zero-mean noise into phantom load (half a request or more per replica under steady traffic, on a
        -- lone frontend with no external load at all), enough to make a busy replica look full. Smoothed
        -- signed, it averages out; the picks count max(0, it) (fdngx.pick.faded).
        local x = p.load - inflight
        local prev = old and old.by_name[p.name]
        if prev and (prev.address ~= p.address or prev.port ~= p.port) then
            -- the name now stands for another server (a replacement on a new port or host): its health and
            -- load history are the old one's, so it starts fresh (its in-flight total stays: requests still
            -- open on the old address end into it, fdngx.ledger)
            fresh[#fresh + 1] = p.name
            prev = nil
        end
        local was = prev and dict:get("x:" .. p.name)
        if was then x = keep * was + (1 - keep) * x end
        -- (a refusal part-way leaves some estimates moved: estimates, smoothed, of the peers in force)
        local new = not (old and old.by_name[p.name])
        ok, err = put(dict, "x:" .. p.name, x)
        if ok and new then written[#written + 1] = "x:" .. p.name end
        if ok then
            ok, err = put(dict, "ip:" .. p.name, inflight)
            if ok and new then written[#written + 1] = "ip:" .. p.name end
        end
        if ok and (not prev or prev.down ~= p.down) then
            ok, err = put(dict, "sa:" .. p.name, now)
            if ok and new then written[#written + 1] = "sa:" .. p.name end
        end
        if not ok then return refused(err) end
    end
    local removed = peers.missing(old, snap)
    for _, name in ipairs(removed) do
        -- a peer re-added later starts fresh; its in-flight total stays until its open requests end, and
        -- goes later (M.sweep), not here: until `ver` moves below, every worker may still pick it
        fresh[#fresh + 1] = name
    end
    local added = peers.missing(snap, old)
    for _, name in ipairs(added) do
        dict:delete("rm:" .. name) -- before the snapshot naming it is in force: no sweep takes its total
        fresh[#fresh + 1] = name -- a record a late probe or request wrote after its removal: it starts fresh
    end
    -- numbers over numbers: in place, once they exist
    ok, err = put(dict, "snap_at", at or now)
    if ok then ok, err = put(dict, "put_at", now) end
    if ok then ok, err = dict:safe_add("ver", 0) end
    if not ok and err ~= "exists" then return refused(err) end
    -- the commit: `gen` moves (or `tie`, within the generation in force)
    ok, err = put(dict, type(id) == "string" and "tie" or "gen", id)
    if not ok then return refused(err) end
    if type(id) ~= "string" then dict:delete("tie") end -- one of the generation before (ignored already)
    if at == nil then store.pushed(dict, now) end -- a push (not the peers file), installed: the pusher's pace
    -- the snapshot now in force is the new one: what only the old one had goes
    for _, name in ipairs(removed) do
        dict:delete("x:" .. name)
        dict:delete("ip:" .. name)
        dict:delete("sa:" .. name)
        -- after those deletes (room); one the dict still refuses, the sweep marks itself (M.sweep)
        put(dict, "rm:" .. name, now)
    end
    if current and store.key(current) ~= key then dict:delete(store.key(current)) end
    dict:delete("snap") -- an older fdngx's one key for every generation (upgraded by a reload)
    local quiet = store.heard(dict, now, put_at)
    -- Health records go after `gen` moves, and before `ver` does (workers re-read records when it moves): a
    -- mark (M.mark) of another worker writing meanwhile either wrote before this delete, or reads the new
    -- `gen` afterwards and takes its record back.
    for _, name in ipairs(fresh) do dict:delete("h:" .. name) end
    dict:incr("ver", 1)
    return added, removed, quiet
end

-- A removed peer's in-flight total (i:, fdngx.ledger) is deleted once it is at 0 and the peer has been out
-- of the snapshot in force for this long (seconds): without it, every peer a registry fleet's churn ever
-- named would keep a key, and a full dict evicts keys that matter. A peer is picked only from a worker's
-- copy, synced in the same step as the pick and its increment (fdngx.balancer.balance), so one out of the
-- snapshot this long is picked by nobody and no increment races the delete (the dict has no
-- compare-and-delete).
M.SWEEP_AFTER = 1.0

-- Peer `name` is not in the snapshot `id` (fdngx.store.id): mark its total, or delete it (and the mark) once
-- it has been marked SWEEP_AFTER and no request is open. Returns 1 when a total went.
local function sweep_one(dict, name, id, now)
    local total, mark = "i:" .. name, "rm:" .. name
    local n, at = dict:get(total), dict:get(mark)
    if not at then
        -- a total no push marked (left by an older fdngx, or made again by a worker whose sync failed)
        if n then dict:safe_set(mark, now) end
        return 0
    end
    -- a push re-adding it meanwhile moves the id before any worker can pick it
    if now - at < M.SWEEP_AFTER or (n or 0) > 0 or store.id(dict) ~= id then return 0 end
    dict:delete(total)
    dict:delete(mark)
    return n and 1 or 0
end

-- Delete the in-flight totals of peers out of the snapshot in force that have no request open (above).
-- `keys`: the dict's keys (dict:get_keys(0), shared with fdngx.ledger.reap); the caller holds the reaper's
-- lock. Returns how many totals went.
function M.sweep(pool, now, keys)
    local dict = pool.dict
    local id = store.id(dict)
    local cur = in_force(pool, dict)
    if not cur then return 0 end
    local swept = 0
    for _, key in ipairs(keys) do
        local kind, name = key:match("^(%a+):(.+)$")
        if (kind == "i" or kind == "rm") and not cur.by_name[name] then
            swept = swept + sweep_one(dict, name, id, now)
        elseif kind == "h" and not cur.by_name[name] and store.id(dict) == id then
            -- a health record of a peer out of the snapshot (a probe that ended as a push removed it wrote
            -- it back): none is written for such a peer (M.mark), so it is left over; a push in between
            -- (the id moved) may have re-added the peer, whose record then stays
            dict:delete(key)
        end
    end
    return swept
end

-- Refresh this worker's copy if `ver` moved. Returns true when something was re-read, or nil and an error
-- (the copy in use stays).
function M.sync(pool, now, force)
    local dict = pool.dict
    local ver = dict:get("ver")
    if ver == pool.ver and not force then return false end
    local id = store.id(dict)
    if id ~= pool.id or force then
        local text, gen, in_id = store.text(dict)
        local snap, err = peers.parse(text)
        if not snap then return nil, "snapshot in the shared dict: " .. err end
        for _, p in ipairs(snap.peers) do
            -- smoothed, fraction included; the picks count it in whole requests (fdngx.pick.external): a
            -- request of this nginx's that ended between the scrape and the push is counted there once, and
            -- the fraction the smoothing keeps of it for seconds must not break every tie among idle peers
            -- (measured before: an idle fleet sent 60 of 60 sequential requests to one replica)
            p.ext = dict:get("x:" .. p.name) or 0
            local was = pool.by_name and pool.by_name[p.name]
            p.cw = was and was.cw -- its place in the tie rotation (fdngx.pick.least) outlives a push
            p.s_at = dict:get("sa:" .. p.name) or 0
            p.at_push = dict:get("ip:" .. p.name) -- nil: none recorded (fdngx.pick.others counts no change)
            p.ikey = "i:" .. p.name -- its in-flight counter (fdngx.ledger), read once per pick
        end
        pool.peers, pool.by_name, pool.gen, pool.id = snap.peers, snap.by_name, gen, in_id
        pool.frontends = snap.frontends
        pool.snap_at, pool.hold = dict:get("snap_at") or now, store.hold(dict)
    end
    for _, p in ipairs(pool.peers) do
        p.h = health.decode(dict:get("h:" .. p.name))
    end
    pool.ver = ver
    return true
end

-- The longest a probe runs (its connect, send and status line, under one deadline: fdngx.balancer), and
-- how long its pr: lock lasts: given back when the probe ends, this only matters for a worker killed
-- mid-probe.
M.PROBE_DEADLINE = 1.5
M.PROBE_HOLD = M.PROBE_DEADLINE + 0.5

-- Start the /health probes due at `now` (fdngx.health.needs_probe): one per peer every PROBE_EVERY over all
-- workers, the pl: lock deciding which worker, and never a second while one is running (pr:, held until it
-- ends: a peer that accepts and never answers would otherwise gather a probe per PROBE_EVERY, and their
-- timers crowd out every other, the balancer's own tick included). start(pool, p) -> ok, err starts one
-- (ngx.timer.at; it refuses past the worker's own cap). One that cannot start (the cap, lua_max_pending_timers,
-- the worker exiting) gives its locks back at once: the next tick (any worker's, every 0.1 s) tries again
-- instead of the probe being skipped until the lock lapses. The rest wait for that tick too (they would
-- fail alike). Returns the peer that could not be probed and why, or nil.
function M.probes(pool, now, start)
    local dict, list = pool.dict, pool.peers
    local n = #list
    if n == 0 then return nil end
    -- Each tick starts where the last one stopped (the peer whose probe could not start first), else one
    -- further: in list order, the first peers due would take every free probe slot at every tick, and a peer
    -- further down the list that accepts and never answers might never be probed at all.
    local from = (pool.probe_from or 0) % n
    pool.probe_from = from + 1
    for k = 0, n - 1 do
        local i = (from + k) % n
        local p = list[i + 1]
        local lock, running = "pl:" .. p.name, "pr:" .. p.name
        if health.needs_probe(p.h, p.down, now) and dict:get(running) == nil then
            local ok, err = dict:safe_add(lock, true, health.PROBE_EVERY)
            if ok then
                ok, err = dict:safe_add(running, true, M.PROBE_HOLD)
                if ok then
                    ok, err = start(pool, p)
                    if not ok then
                        dict:delete(lock)
                        dict:delete(running)
                        pool.probe_from = i
                        return p.name, tostring(err)
                    end
                elseif err ~= "exists" then
                    dict:delete(lock)
                end
            end
            -- "exists": another worker's, or running; anything else: no room for the lock (a full dict)
            if not ok and err ~= "exists" then
                pool.probe_from = i
                return p.name, M.full(pool, err, "not probed")
            end
        end
    end
    return nil
end

-- A probe of `name` has ended (however): the next may start.
function M.probed(pool, name)
    pool.dict:delete("pr:" .. name)
end


-- Apply a health event to peer `name`: event(record, now) -> record. Shared at once, and in this worker's
-- copy. `ver` moves only when what the workers read changes (fdngx.health.differs): every worker re-reads
-- every record when it moves, and most probe results change nothing (a peer still down, still held out; a
-- 200 from a peer that is already in). A record whose ok_at alone changed is not written at all: written
-- unannounced, it could put back an older record another worker has just replaced (and announced), and
-- workers that synced in between would keep the newer one until some later change.
-- Two workers racing on one record can lose one update (one back-off step): harmless, as it is announced.
-- Returns the new record and whether the peer's usability changed.
-- `addr`, `port`: where the evidence came from (a probe, or a request: it may be older than a push); a peer
-- that has moved since gets no record from its old address.
function M.mark(pool, name, event, now, addr, port)
    -- A peer a push removed meanwhile gets no record: re-added later, it starts fresh (a result that ends after
    -- the re-add, from the same address, is that server's own and counts). Asked of the snapshot in force, not
    -- of this worker's copy from before the push (a probe takes up to 1.5 s). The id first: a push that lands
    -- after it is seen below.
    local dict = pool.dict
    local id = store.id(dict)
    -- a push whose `gen` is set and whose `ver` is not yet: its snapshot is already in the dict (set first)
    M.sync(pool, now, id ~= pool.id)
    local function gone()
        local p = pool.by_name and pool.by_name[name]
        return (pool.by_name and not p) or (addr and p and (p.addr ~= addr or p.port ~= port)), p
    end
    local moved_off, in_force = gone()
    if moved_off then return nil, false end
    local key = "h:" .. name
    local h = health.decode(dict:get(key))
    local n = event(h, now)
    if n == h then return h, false end
    local text = health.encode(n)
    n = health.decode(text) -- as every worker reads it (times in ms)
    if not health.differs(h, n) then return h, false end
    -- a full dict: the evidence is lost (fdngx.balancer says the dict is full where a counter cannot go in)
    if not put(dict, key, text) then return h, false end
    if store.id(dict) ~= id then
        -- A push (another worker) came in between: what was just written may be of a server it removed or
        -- moved, after its install deleted that record. Asked again of its snapshot (`ver` may not have moved
        -- yet), and taken back if so.
        M.sync(pool, now, true)
        moved_off, in_force = gone()
        if moved_off then
            dict:delete(key)
            return nil, false
        end
    end
    dict:incr("ver", 1) -- there since the first install
    if in_force then in_force.h = health.decode(text) end
    return n, health.balancer_out(h, now) ~= health.balancer_out(n, now)
end

return M
