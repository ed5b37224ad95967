-- fdngx.pool: installing snapshots in the shared dict and each worker's copy of them.
local pool_mod = require("fdngx.pool")
local peers = require("fdngx.peers")
local health = require("fdngx.health")
local pick = require("fdngx.pick")
local ledger = require("fdngx.ledger")
local store = require("fdngx.store")
local fakedict = require("fakedict")

local function snap(gen, lines)
    local text = "generation " .. gen .. "\n" .. table.concat(lines, "\n") .. "\n"
    return text, assert(peers.parse(text))
end

local function new_pool(dict) return { name = "fastdeploy", dict = dict } end

local function install(pool, gen, lines, now)
    local text, parsed = snap(gen, lines)
    return pool_mod.install(pool, text, parsed, now or 0)
end

-- A pool that installed `lines` at `now` and a second worker's copy, synced: dict, pool, worker.
local function two_workers(lines, now)
    local dict = fakedict.new()
    local pool, worker = new_pool(dict), new_pool(dict)
    install(pool, 1, lines, now)
    pool_mod.sync(worker, now)
    return dict, pool, worker
end

-- The reaper's pass (fdngx.balancer's tick, under its lock) as far as the totals go: the sweep at `now`.
local function sweep(pool, now)
    pool.dict.clock = now
    return pool_mod.sweep(pool, now, pool.dict:get_keys(0))
end

-- The dict's keys that name peer `name` (its in-flight total, share, marker, load, health...).
local function keys_of(dict, name)
    local out = {}
    for _, k in ipairs(dict:get_keys(0)) do
        if k:sub(-#name - 1) == ":" .. name then out[#out + 1] = k end
    end
    return table.concat(out, ",")
end

return {
    ["verdict: newer installs, older is stale, far-future is refused and never wedges the pool"] = function(t)
        local now = 1733212345.678 -- seconds; generations are milliseconds
        local ms = now * 1000
        t.eq(pool_mod.verdict(nil, 1, now), "ok")
        t.eq(pool_mod.verdict(ms - 10, ms, now), "ok")
        t.eq(pool_mod.verdict(ms, ms, now), "unchanged")
        t.eq(pool_mod.verdict(ms, ms - 10, now), "stale")
        -- a clock a little ahead (another host) is a generation like any other
        t.eq(pool_mod.verdict(ms, ms + pool_mod.FUTURE_MS, now), "ok")
        t.eq(pool_mod.verdict(nil, ms + pool_mod.FUTURE_MS + 1, now), "future")
        t.eq(pool_mod.verdict(ms, 2 ^ 53, now), "future")
        -- a generation in force from the future (pushed before this rule) gives way to an honest one
        t.eq(pool_mod.verdict(2 ^ 53, ms, now), "ok")
        t.eq(pool_mod.verdict(2 ^ 53, ms - 10, now), "ok")
    end,

    ["verdict: an older generation takes over once the one in force was not pushed again for SILENT_AFTER"] = function(t)
        -- An outside review: a standby controller whose clock is behind the dead one's was refused as stale
        -- for as long as the skew (a minute of blind failover for a clock a minute ahead).
        local now = 1733212345.678
        local ahead = now * 1000 + 60000 -- the silent controller's clock was a minute ahead
        t.eq(store.SILENT_AFTER, pick.STALE_AFTER)
        t.eq(pool_mod.verdict(ahead, now * 1000, now, 2, nil), "stale", "its pusher is heard: the newest wins")
        t.eq(pool_mod.verdict(ahead, now * 1000, now, store.SILENT_AFTER - 0.01), "stale")
        t.eq(pool_mod.verdict(ahead, now * 1000, now, store.SILENT_AFTER), "taken")
        t.eq(pool_mod.verdict(ahead, now * 1000, now), "stale", "no install time known: never taken")
        t.eq(pool_mod.verdict(ahead, ahead + 1, now, 0), "ok", "a newer one is newer, silent or not")
        t.eq(pool_mod.verdict(nil, now * 1000 + pool_mod.FUTURE_MS + 1, now, 3600), "future", "the window holds")
        -- the same generation: the same bytes are a retry; other bytes, the ones that sort last win
        t.eq(pool_mod.verdict(ahead, ahead, now, 1, 0), "unchanged")
        t.eq(pool_mod.verdict(ahead, ahead, now, 1, 1), "tie")
        t.eq(pool_mod.verdict(ahead, ahead, now, 1, -1), "stale")
        t.eq(store.order("b", "a"), 1); t.eq(store.order("a", "b"), -1); t.eq(store.order("a", "a"), 0)
    end,

    ["a tie (other bytes, the same generation) goes in under its own id: every worker re-reads it"] = function(t)
        local dict = fakedict.new()
        local admin, worker = new_pool(dict), new_pool(dict)
        install(admin, 7, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        pool_mod.sync(worker, 1)
        local id = store.id(dict)
        t.eq(id, 7); t.eq(store.next_id(id, 7), "7/1"); t.eq(store.next_id(id, 8), 8)
        local added, removed = install(admin, 7, { "peer a 127.0.0.1 1 5 0 64 0", "peer c 127.0.0.1 3 20 0 64 0" }, 2)
        t.eq(table.concat(added, ","), "c"); t.eq(table.concat(removed, ","), "b")
        t.eq(store.id(dict), "7/1"); t.eq(dict:get("gen"), 7)
        t.eq(dict:get("snap:7"), nil, "the text it replaced is gone"); t.ok(dict:get("snap:7/1"))
        t.eq(pool_mod.sync(worker, 2), true)
        t.eq(worker.by_name.a.weight, 5); t.eq(worker.by_name.b, nil); t.ok(worker.by_name.c)
        t.eq(worker.gen, 7); t.eq(worker.id, "7/1")
        install(admin, 7, { "peer a 127.0.0.1 1 6 0 64 0" }, 3)
        t.eq(store.id(dict), "7/2"); t.eq(dict:get("snap:7/1"), nil)
        -- the next generation: a plain id again, the tie left behind is deleted
        install(admin, 8, { "peer a 127.0.0.1 1 9 0 64 0" }, 4)
        t.eq(store.id(dict), 8); t.eq(dict:get("tie"), nil); t.eq(dict:get("snap:7/2"), nil)
        pool_mod.sync(worker, 4)
        t.eq(worker.by_name.a.weight, 9); t.eq(worker.id, 8)
        -- a mark racing a tie sees it as the push it is (a removed peer gets no record)
        install(admin, 8, { "peer b 127.0.0.1 2 9 0 64 0" }, 5)
        t.eq(pool_mod.mark(worker, "a", health.on_failure, 5), nil)
        t.eq(dict:get("h:a"), nil)
    end,

    ["silence: said once when nothing was pushed for SILENT_AFTER, and once when a push comes again"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        install(pool, 1, { "peer a 127.0.0.1 1 20 1 64 0" }, 100)
        pool_mod.sync(pool, 100)
        t.eq(pool_mod.silent(pool, 100 + store.SILENT_AFTER - 0.01), false)
        t.eq(pool_mod.silent(pool, 100 + store.SILENT_AFTER), true)
        t.eq(store.went_quiet(dict, 109), nil)
        t.near(store.went_quiet(dict, 111), 11, 1e-9)
        t.eq(store.went_quiet(dict, 112), nil, "said once (over all workers: the dict remembers)")
        local _, _, quiet = install(pool, 2, { "peer a 127.0.0.1 1 20 1 64 0" }, 130)
        t.near(quiet, 30, 1e-9, "the install after it says how long it lasted")
        pool_mod.sync(pool, 130)
        t.eq(pool_mod.silent(pool, 131), false)
        local _, _, again = install(pool, 3, { "peer a 127.0.0.1 1 20 1 64 0" }, 132)
        t.eq(again, nil, "no silence said: nothing to say")
        -- its pace: 30 s, then 2 s: the hold went to 90 s, then halves (fdngx.store.pushed)
        t.eq(store.hold(dict), 45)
        t.eq(store.went_quiet(dict, 142), nil)
        t.near(store.went_quiet(dict, 132 + 45), 45, 1e-9, "the next silence is said again")
    end,

    ["the peers file's data is as old as its generation: an old one holds nothing down from the start"] = function(t)
        local now = 1733212345.678
        t.eq(store.data_at(now * 1000 - 3600000, now, false), now - 3600)
        t.eq(store.data_at(now * 1000 + 60000, now, false), now, "a clock ahead wrote it: not in the future")
        t.eq(store.data_at(1, now, true), now, "a push's is its install")
        local dict = fakedict.new()
        local pool = new_pool(dict)
        local text, parsed = snap(math.floor(now * 1000) - 3600000, { "peer a 127.0.0.1 1 20 1 64 0" })
        pool_mod.install(pool, text, parsed, now, store.data_at(parsed.generation, now, false))
        pool_mod.sync(pool, now)
        t.eq(pool_mod.silent(pool, now), true)
        t.eq(store.went_quiet(dict, now + 1), nil, "but no push was missed yet: said SILENT_AFTER after the start")
        t.near(store.went_quiet(dict, now + store.SILENT_AFTER), store.SILENT_AFTER, 1e-6)
    end,

    ["install: external load is what this nginx did not send; membership changes are reported"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        local added, removed = install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0",
                                                                "peer b 127.0.0.1 2 20 0 64 0" })
        t.eq(table.concat(added, ","), "a,b"); t.eq(#removed, 0)
        dict:set("i:a", 3)
        -- a push after the previous one faded out entirely (STALE_AFTER): taken whole
        local later = pick.STALE_AFTER + 1
        dict.clock = later
        added, removed = install(pool, 2, { "peer a 127.0.0.1 1 20 0 64 5.5",
                                                          "peer c 127.0.0.1 3 20 1 64 1" }, later)
        t.eq(table.concat(added, ","), "c"); t.eq(table.concat(removed, ","), "b")
        t.eq(dict:get("x:a"), 2.5)
        t.eq(dict:get("x:c"), 1)
        t.eq(dict:get("x:b"), nil)
        t.eq(dict:get("gen"), 2); t.eq(dict:get("snap_at"), later)
    end,

    ["install: this nginx's own in flight at the push, and the frontends count, reach every worker"] = function(t)
        local dict = fakedict.new()
        local pool, worker = new_pool(dict), new_pool(dict)
        dict:set("i:a", 3)
        local text = "generation 1\nfrontends 4\npeer a 127.0.0.1 1 20 0 64 5\npeer b 127.0.0.1 2 20 0 64 0\n"
        pool_mod.install(pool, text, assert(peers.parse(text)), 0)
        t.eq(dict:get("ip:a"), 3); t.eq(dict:get("ip:b"), 0)
        pool_mod.sync(worker, 0)
        t.eq(worker.frontends, 4)
        t.eq(worker.by_name.a.at_push, 3); t.eq(worker.by_name.b.at_push, 0)
        -- a push without the line (a sidecar of its own) says one; a removed peer's count goes with it
        install(pool, 2, { "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        pool_mod.sync(worker, 1)
        t.eq(worker.frontends, 1); t.eq(dict:get("ip:a"), nil)
    end,

    ["install: external load is smoothed across pushes: a swing shrinks, a steady load comes through"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        local function push(gen, load, now)
            install(pool, gen, { "peer a 127.0.0.1 1 20 0 64 " .. load, "peer n 127.0.0.1 2 20 0 64 0" }, now)
            return dict:get("x:a")
        end
        t.eq(push(1, 10, 0), 10, "a first push is taken whole")
        t.near(push(2, 0, 1), 10 * math.exp(-1 / pool_mod.SMOOTH), 1e-9)
        -- other frontends swinging 0 <-> 8 from push to push (1 s apart): seen as a small swing around 4
        local lo, hi = math.huge, -math.huge
        for gen = 3, 40 do
            local x = push(gen, gen % 2 == 0 and 8 or 0, gen - 1)
            if gen > 20 then lo, hi = math.min(lo, x), math.max(hi, x) end
        end
        t.ok(hi - lo < 8 / 3, "swing " .. (hi - lo) .. " of 8")
        t.near((hi + lo) / 2, 4, 0.2)
        -- traffic that goes to the replica directly and stays: within 10 % of it after 5 s of pushes
        local x
        for gen = 41, 46 do x = push(gen, 12, gen - 1) end
        t.near(x, 12, 1.2)
        -- a peer added by a push starts from its own load, not from nothing
        install(pool, 47, { "peer a 127.0.0.1 1 20 0 64 12", "peer b 127.0.0.1 3 20 0 64 7" }, 47)
        t.eq(dict:get("x:b"), 7)
    end,

    ["install: this nginx's own requests starting and ending around a scrape add no phantom load"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        dict:set("i:a", 10) -- ten requests of this nginx open on a; nothing else sends there
        -- each scrape saw one request more or fewer than were open at the push (one ended, or one started,
        -- in between): zero-mean noise. Clamped at 0 per push it came out as about half a request, and
        -- counted as one in the picks more than half of the time
        local counted = 0
        for gen = 1, 40 do
            install(pool, gen, { "peer a 127.0.0.1 1 20 0 64 " .. (gen % 2 == 0 and 11 or 9) }, gen)
            local x = dict:get("x:a")
            if gen > 10 then
                t.ok(math.abs(x) < 0.6, "x " .. x)
                counted = counted + pick.external(x, gen, gen)
            end
        end
        t.eq(counted, 0, "phantom requests counted over 30 pushes")
    end,

    ["sync: a phantom request counts as none in the picks, so idle peers tie again; a steady one counts"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        local function ext(gen, load, now)
            install(pool, gen, { "peer a 127.0.0.1 1 20 0 64 " .. load, "peer b 127.0.0.1 2 20 0 64 0" }, now)
            pool_mod.sync(pool, now)
            return pick.external(pool.by_name.a.ext, pool.snap_at, now), pool.by_name.a.ext
        end
        ext(1, 0, 0)
        local seen, kept = ext(2, 1, 1)  -- one request seen once (it ended between the scrape and the push)
        t.eq(seen, 0, "less than half a request is none for the picks")
        t.ok(kept > 0, "but the smoothing keeps it")
        for gen = 3, 8 do seen = ext(gen, 1, gen - 1) end
        t.eq(seen, 1, "a request that stays there comes through, whole")
        for gen = 9, 11 do seen = ext(gen, 0, gen - 1) end
        t.eq(seen, 0, "and once gone it is none after a few pushes, not a fraction left for seconds")
        t.eq(pick.external(pool.by_name.b.ext, pool.snap_at, 10), 0)
    end,

    ["sync: a push keeps each peer's place in the tie rotation"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 0)
        pool_mod.sync(pool, 0)
        local zero = function() return 0 end
        local first = pick.choose("least", pool.peers, {}, function() return true end, zero, math.random, {})
        install(pool, 2, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        pool_mod.sync(pool, 1)
        local second = pick.choose("least", pool.peers, {}, function() return true end, zero, math.random, {})
        t.ok(first.name ~= second.name, "the other idle peer is next, across the push")
    end,

    ["install: a worker's copy of the generation in force stands in for parsing it again"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" })
        t.eq(pool_mod.sync(pool, 1), true)
        local parse, parsed = peers.parse, 0
        peers.parse = function(text) parsed = parsed + 1; return parse(text) end
        local added, removed = install(pool, 2, { "peer b 127.0.0.1 2 20 1 64 0", "peer c 127.0.0.1 3 20 0 64 0" })
        t.eq(parsed, 1, "only the new snapshot was parsed (by the test's own snap())")
        t.eq(table.concat(added, ","), "c"); t.eq(table.concat(removed, ","), "a")
        t.eq(dict:get("sa:b"), 0, "b's down flag moved")
        -- A stale copy (another worker installed meanwhile): parsed from the dict instead.
        install(new_pool(dict), 3, { "peer c 127.0.0.1 3 20 0 64 0" })
        parsed = 0
        added, removed = install(pool, 4, { "peer c 127.0.0.1 3 20 0 64 0", "peer d 127.0.0.1 4 20 0 64 0" })
        peers.parse = parse
        t.eq(parsed, 2); t.eq(table.concat(added, ","), "d"); t.eq(#removed, 0)
    end,

    ["install: the sidecar's down changes are timed, unchanged flags keep their time"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0" }, 10)
        t.eq(dict:get("sa:a"), 10)
        install(pool, 2, { "peer a 127.0.0.1 1 20 0 64 0" }, 20)
        t.eq(dict:get("sa:a"), 10)
        install(pool, 3, { "peer a 127.0.0.1 1 20 1 64 0" }, 30)
        t.eq(dict:get("sa:a"), 30)
    end,

    ["sync: a worker re-reads only when ver moves, re-parses only when the generation does"] = function(t)
        local dict = fakedict.new()
        local admin, worker = new_pool(dict), new_pool(dict)
        install(admin, 1, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 10 0 32 0" }, 1)
        t.eq(pool_mod.sync(worker, 1), true)
        t.eq(#worker.peers, 2); t.eq(worker.by_name.b.weight, 10); t.eq(worker.gen, 1)
        t.eq(pool_mod.sync(worker, 2), false, "nothing moved")
        local before = worker.peers
        pool_mod.mark(admin, "a", health.on_failure, 3)
        t.eq(pool_mod.sync(worker, 3), true)
        t.ok(worker.peers == before, "a health change does not re-parse the snapshot")
        t.ok(not health.usable(worker.by_name.a.h, false, 0, 3), "but the health is shared at once")
        install(admin, 2, { "peer a 127.0.0.1 1 5 0 64 0" }, 4)
        pool_mod.sync(worker, 4)
        t.eq(#worker.peers, 1); t.eq(worker.by_name.a.weight, 5); t.eq(worker.by_name.b, nil)
    end,

    ["a removed peer's health is forgotten: re-added, it starts fresh"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0" }, 1)
        pool_mod.mark(pool, "a", health.on_failure, 1)
        t.ok(dict:get("h:a") ~= nil)
        install(pool, 2, { "peer b 127.0.0.1 2 20 0 64 0" }, 2)
        t.eq(dict:get("h:a"), nil)
        -- A request still open on `a` when the push removed it fails afterwards (the worker has synced the
        -- new snapshot): no record comes back.
        pool_mod.sync(pool, 3)
        local h, moved = pool_mod.mark(pool, "a", health.on_failure, 3)
        t.eq(h, nil); t.eq(moved, false)
        t.eq(dict:get("h:a"), nil, "re-added later, it would start out")
    end,

    ["a removed peer's in-flight total goes once its requests end; re-added, it starts at 0"] = function(t)
        local dict = fakedict.new()
        local pool, w = new_pool(dict), ledger.new(dict, "100.1")
        install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        w:acquire("a"); w:acquire("b"); w:acquire("b")
        install(pool, 2, { "peer a 127.0.0.1 1 20 0 64 0" }, 10)
        pool_mod.sync(pool, 10)
        t.eq(sweep(pool, 20), 0, "two requests still open on b")
        t.eq(w:inflight("b"), 2)
        w:release("b"); w:release("b")
        t.eq(sweep(pool, 22), 1)
        t.eq(keys_of(dict, "b"), "", "nothing of b is left in the dict")
        w:release("a")
        t.eq(sweep(pool, 24), 0, "a peer in force keeps its total at 0")
        t.eq(dict:get("i:a"), 0)
        install(pool, 3, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 30)
        pool_mod.sync(pool, 30)
        t.eq(w:inflight("b"), 0)
        w:acquire("b")
        t.eq(w:inflight("b"), 1, "re-added, it counts from 0")
    end,

    ["a peer removed a moment ago keeps its total: a worker that synced just before may still pick it"] = function(t)
        local dict, pool, worker = two_workers({ "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        local w = ledger.new(dict, "200.1")
        w:acquire("b"); w:release("b") -- b's total is at 0
        install(pool, 2, { "peer a 127.0.0.1 1 20 0 64 0" }, 10)
        -- `worker` synced just before the push and picks b now: during the sweep, if the sweep reads i:b
        -- (between that read and a delete), else after it
        t.ok(worker.by_name.b ~= nil)
        local get, picked = dict.get, false
        dict.get = function(self, key)
            local v = get(self, key)
            if key == "i:b" and not picked then picked = true; w:acquire("b") end
            return v
        end
        sweep(pool, 10 + pool_mod.SWEEP_AFTER / 2)
        dict.get = get
        if not picked then w:acquire("b") end
        t.eq(w:inflight("b"), 1, "the pick is counted")
        w:release("b")
        sweep(pool, 10 + pool_mod.SWEEP_AFTER)
        t.eq(dict:get("i:b"), nil); t.eq(dict:get("rm:b"), nil)
    end,

    ["re-added before the sweep, a peer keeps its total and the requests still open on it"] = function(t)
        local dict = fakedict.new()
        local pool, w = new_pool(dict), ledger.new(dict, "300.1")
        install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        w:acquire("b")
        install(pool, 2, { "peer a 127.0.0.1 1 20 0 64 0" }, 10)
        install(pool, 3, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 11)
        t.eq(dict:get("rm:b"), nil, "in force again: no longer marked")
        w:release("b")
        t.eq(sweep(pool, 20), 0)
        t.eq(dict:get("i:b"), 0)
        w:acquire("b")
        t.eq(w:inflight("b"), 1)
    end,

    ["the sweep deletes no total while a push re-adds its peer (gen moved): no in-flight count is lost"] = function(t)
        local dict = fakedict.new()
        local pool, other, w = new_pool(dict), new_pool(dict), ledger.new(dict, "400.1")
        install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        w:acquire("b"); w:release("b") -- b's total is at 0
        install(pool, 2, { "peer a 127.0.0.1 1 20 0 64 0" }, 2)
        pool_mod.sync(pool, 2)
        -- another worker re-adds b and a request picks it: after the sweep has read b's total and mark
        local get, readded = dict.get, false
        local function readd()
            readded = true
            install(other, 3, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 10)
            w:acquire("b")
        end
        dict.get = function(self, key)
            local v = get(self, key)
            if key == "rm:b" and not readded then readd() end
            return v
        end
        sweep(pool, 10)
        dict.get = get
        t.ok(readded, "the sweep looked at b")
        t.eq(w:inflight("b"), 1)
    end,

    ["a total no push marked goes too, SWEEP_AFTER after a sweep first finds it; so does a mark alone"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        install(pool, 2, { "peer a 127.0.0.1 1 20 0 64 0" }, 2) -- b, never picked: marked, no total
        pool_mod.sync(pool, 2)
        dict:set("i:old", 0) -- left by an fdngx from before the sweep (the dict survives reloads)
        t.eq(sweep(pool, 10), 0)
        t.eq(dict:get("i:old"), 0, "found just now: a worker may still pick it")
        t.eq(dict:get("rm:b"), nil, "a mark with no total to sweep goes")
        t.eq(sweep(pool, 10 + pool_mod.SWEEP_AFTER), 1)
        t.eq(keys_of(dict, "old"), ""); t.eq(keys_of(dict, "b"), "")
    end,

    ["a probe that ends after a push removed its peer writes no record; one left over goes at the sweep"] = function(t)
        -- The worker that ran the probe has not synced since the push (a probe takes up to 1.5 s).
        local dict, admin, worker = two_workers({ "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        install(admin, 2, { "peer b 127.0.0.1 2 20 0 64 0" }, 2)
        t.ok(worker.by_name.a ~= nil, "the worker's copy still names a")
        local h, moved = pool_mod.mark(worker, "a", health.on_failure, 2.5, "127.0.0.1", 1)
        t.eq(h, nil); t.eq(moved, false)
        t.eq(dict:get("h:a"), nil, "no record of a peer the snapshot in force does not name")
        -- A record left by an older fdngx (or a race with a push) goes at the next sweep; b's stays.
        pool_mod.mark(worker, "b", health.on_failure, 2.6)
        dict:set("h:gone", "left over")
        sweep(worker, 3)
        t.eq(dict:get("h:gone"), nil)
        t.ok(dict:get("h:b") ~= nil, "a peer in the snapshot keeps its record")
    end,

    ["a name that moves to another address starts fresh: no old health, load or probe result"] = function(t)
        local dict, admin, worker = two_workers({ "peer a 127.0.0.1 1 20 0 64 8" }, 1)
        for i = 1, 4 do pool_mod.mark(admin, "a", health.on_failure, 1 + i * 0.01) end
        t.ok(dict:get("h:a") ~= nil)
        t.ok(dict:get("x:a") == 8)
        -- a replacement on a new port under the same name, idle
        install(admin, 2, { "peer a 127.0.0.1 7 20 0 64 0" }, 1.5)
        t.eq(dict:get("h:a"), nil, "the old server's failures are not the new one's")
        t.eq(dict:get("x:a"), 0, "its load is the pushed one, not smoothed with the old server's")
        t.eq(dict:get("sa:a"), 1.5)
        -- a probe of the old address that ends now says nothing of the new one
        local h = pool_mod.mark(worker, "a", health.on_failure, 1.6, "127.0.0.1", 1)
        t.eq(h, nil); t.eq(dict:get("h:a"), nil)
        -- one of the new address counts
        h = pool_mod.mark(worker, "a", health.on_failure, 1.7, "127.0.0.1", 7)
        t.ok(h ~= nil and dict:get("h:a") ~= nil)
        -- the same address again: history kept (the load smoothed across the push)
        install(admin, 3, { "peer a 127.0.0.1 7 20 0 64 0" }, 1.8)
        t.ok(dict:get("h:a") ~= nil)
    end,

    ["a push between a mark's read and its write takes back a record of the server it moved or removed"] = function(t)
        -- Another worker's push lands while this worker's probe result is being applied (shared-dict steps are
        -- atomic one by one, not together): simulated by the push running inside the event.
        local dict, admin, worker = two_workers({ "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
        local function pushed(lines, gen)
            return function(rec, now)
                install(admin, gen, lines, now)
                return health.on_probe(rec, false, now)
            end
        end
        local h = pool_mod.mark(worker, "a", pushed({ "peer a 127.0.0.1 7 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 2),
                                2, "127.0.0.1", 1)
        t.eq(h, nil); t.eq(dict:get("h:a"), nil, "moved: the old address's failed probe is not the new server's")
        h = pool_mod.mark(worker, "b", pushed({ "peer a 127.0.0.1 7 20 0 64 0" }, 3), 3, "127.0.0.1", 2)
        t.eq(h, nil); t.eq(dict:get("h:b"), nil, "removed: no record left")
        -- A push that leaves the peer where it was keeps the record.
        h = pool_mod.mark(worker, "a", pushed({ "peer a 127.0.0.1 7 20 0 64 0" }, 4), 4, "127.0.0.1", 7)
        t.ok(h ~= nil and dict:get("h:a") ~= nil)
        -- Re-added later, a peer starts fresh even if a record of it was left.
        dict:set("h:b", "1 3 9.000 1.000 0.000")
        install(admin, 5, { "peer a 127.0.0.1 7 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 5)
        t.eq(dict:get("h:b"), nil)
    end,

    ["a push and a mark interleaved step by step (3,000 orders): no record of the server it moved or removed"] = function(t)
        -- Two workers run at once; the shared dict makes each step atomic, not a function. Each side runs as a
        -- coroutine whose every dict call waits for the scheduler's turn; 3,000 seeded random orders of the
        -- push's steps (another worker's admin call) and a failed probe's mark (of the old address).
        local function stepping(dict)
            return setmetatable({}, { __index = function(_, key)
                local f = dict[key]
                return function(_, ...)
                    coroutine.yield()
                    return f(dict, ...)
                end
            end })
        end
        local seed = 777
        local function rand(n) -- the high bits: an LCG's low bits repeat with a short period
            seed = (seed * 1103515245 + 12345) % 2147483648
            return math.floor(seed / 65536) % n
        end
        local bad = {}
        for trial = 1, 3000 do
            -- the mark starts after `lead` of the push's steps, then the two take turns at random
            local lead, steps = rand(30), 0
            local removed = trial % 2 == 0
            local dict, admin, worker = two_workers({ "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 1)
            local lines = removed and { "peer b 127.0.0.1 2 20 0 64 0" }
                or { "peer a 127.0.0.1 7 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }
            admin.dict, worker.dict = stepping(dict), stepping(dict)
            local push = coroutine.create(function() install(admin, 2, lines, 2) end)
            local mark = coroutine.create(function()
                pool_mod.mark(worker, "a", health.on_failure, 2, "127.0.0.1", 1)
            end)
            while coroutine.status(push) ~= "dead" or coroutine.status(mark) ~= "dead" do
                local first = steps < lead or rand(2) == 0
                local co = (coroutine.status(mark) == "dead" or (coroutine.status(push) ~= "dead" and first))
                    and push or mark
                steps = steps + 1
                assert(coroutine.resume(co))
            end
            if dict:get("h:a") ~= nil then bad[#bad + 1] = trial end
        end
        t.eq(#bad, 0, #bad .. " of 3000 orders left the old server's record (first: order " .. tostring(bad[1]) .. ")")
    end,

    ["churn: a fleet's membership changing for hours leaves no key of a peer that is gone"] = function(t)
        local dict = fakedict.new()
        local pool, worker = new_pool(dict), new_pool(dict)
        local w = ledger.new(dict, "500.1")
        local seed = 4242
        local function rand(n) seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n + 1 end
        local open, now, ids = {}, 0, 0 -- open: names of requests in flight, picked from the worker's copy
        for gen = 1, 300 do
            now = now + 1
            local lines = {}
            for i = 1, 8 do
                ids = ids + (rand(3) == 1 and 1 or 0) -- now and then a replica goes and a new one comes
                lines[i] = string.format("peer r%d-%d 127.0.0.1 %d 20 0 64 0", i, ids, 1000 + i)
            end
            install(pool, gen, lines, now)
            pool_mod.sync(worker, now)
            for _ = 1, rand(4) do
                local p = worker.peers[rand(#worker.peers)]
                w:acquire(p.name); open[#open + 1] = p.name
            end
            while #open > 0 and rand(2) == 1 do w:release(table.remove(open, rand(#open))) end
            if gen % 2 == 0 then sweep(worker, now) end
        end
        while #open > 0 do w:release(table.remove(open)) end
        sweep(worker, now + pool_mod.SWEEP_AFTER)
        pool_mod.sync(worker, now)
        local totals = 0
        for _, k in ipairs(dict:get_keys(0)) do
            t.ok(not k:match("^ip:(.+)$") or worker.by_name[k:sub(4)], "left: " .. k)
            local name = k:match("^i:(.+)$") or k:match("^rm:(.+)$")
            if name then
                t.ok(worker.by_name[name] and k:sub(1, 2) == "i:", "left: " .. k)
                totals = totals + 1
            end
        end
        t.ok(ids > 50, "peers came and went: " .. ids)
        t.ok(totals <= 8, totals .. " totals for 8 peers")
    end,

    ["probes: one that cannot start gives its lock back, and the next tick starts it"] = function(t)
        -- a and b are due (the sidecar says down), c is not
        local dict, pool, worker = two_workers({ "peer a 127.0.0.1 1 20 1 64 0", "peer b 127.0.0.1 2 20 1 64 0",
                                                 "peer c 127.0.0.1 3 20 0 64 0" }, 0)
        pool_mod.sync(pool, 0)
        local started = {}
        local function start(_, p) started[#started + 1] = p.name; return 1 end
        local function full() return nil, "too many pending timers" end
        local name, err = pool_mod.probes(pool, 0, full)
        t.eq(name, "a"); t.eq(err, "too many pending timers")
        t.eq(dict:get("pl:a"), nil, "its lock is given back")
        t.eq(dict:get("pl:b"), nil, "and b's is not taken: it would fail alike")
        -- the next tick (0.1 s later, well before the lock's PROBE_EVERY), in any worker
        dict.clock = 0.1
        t.eq(pool_mod.probes(worker, 0.1, start), nil)
        t.eq(table.concat(started, ","), "a,b")
        -- started ones hold their lock across workers for PROBE_EVERY
        dict.clock = 0.2
        pool_mod.probes(pool, 0.2, start)
        t.eq(#started, 2)
        -- once they have ended (pool.probed), the next ones start after PROBE_EVERY
        pool_mod.probed(pool, "a"); pool_mod.probed(worker, "b")
        dict.clock = 0.1 + health.PROBE_EVERY
        pool_mod.probes(pool, dict.clock, start)
        t.eq(#started, 4); t.ok(started[3] ~= started[4], table.concat(started, ",")) -- a and b again
    end,

    ["probe slots: a worker's cap; a slot whose probe never ran (a timer nginx dropped) lapses"] = function(t)
        local slots = require("fdngx.slots").new(2, pool_mod.PROBE_HOLD)
        t.eq(slots:full(0), false)
        slots:take("a", 0); slots:take("b", 0)
        t.eq(slots:full(0), true, "two taken")
        slots:give("a")
        t.eq(slots:full(0.1), false, "a's probe ended")
        slots:take("c", 0.1)
        -- b's and c's timers were dropped: neither ends, and each slot lapses PROBE_HOLD after it was taken
        t.eq(slots:full(pool_mod.PROBE_HOLD - 0.01), true)
        t.eq(slots:full(pool_mod.PROBE_HOLD + 0.01), false, "b's lapsed")
        t.eq(slots:full(pool_mod.PROBE_HOLD + 0.11), false, "and c's")
        slots:take("d", 10); slots:take("e", 10)
        t.eq(slots:full(10), true, "all of them free again, for good")
    end,

    ["probes: each tick starts further down the list, so no peer waits behind the first ones for good"] = function(t)
        local lines = {}
        for i = 1, 6 do lines[i] = string.format("peer p%d 127.0.0.1 %d 20 1 64 0", i, i) end
        local dict, pool = two_workers(lines, 0)
        pool_mod.sync(pool, 0)
        -- room for two probes a tick (the worker's cap); every one of them ends before the next tick
        local firsts = {}
        for tick = 0, 5 do
            local now = tick * health.PROBE_EVERY
            dict.clock = now
            local n = 0
            local function start(_, p)
                if n == 2 then return nil, "cap" end
                n = n + 1
                firsts[p.name] = firsts[p.name] or tick
                pool_mod.probed(pool, p.name)
                return 1
            end
            pool_mod.probes(pool, now, start)
        end
        for i = 1, 6 do t.ok(firsts["p" .. i] ~= nil, "p" .. i .. " never probed") end
        t.ok(firsts.p5 <= 2 and firsts.p6 <= 2, "the ones after the cap go first next tick")
    end,

    ["probes: never a second one of a peer while one runs (a /health that never answers)"] = function(t)
        local dict, pool, worker = two_workers({ "peer a 127.0.0.1 1 20 1 64 0", "peer b 127.0.0.1 2 20 1 64 0" }, 0)
        pool_mod.sync(pool, 0)
        local started = {}
        local function start(_, p) started[#started + 1] = p.name; return 1 end
        pool_mod.probes(pool, 0, start)
        t.eq(table.concat(started, ","), "a,b")
        -- a's probe hangs; b's ends at once. Every tick of either worker for the next second starts b's only
        pool_mod.probed(worker, "b")
        local now = 0
        while now < pool_mod.PROBE_DEADLINE do
            now = now + 0.1
            dict.clock = now
            pool_mod.probes(now * 10 % 2 < 1 and pool or worker, now, start)
            pool_mod.probed(pool, "b")
        end
        local a = 0
        for _, name in ipairs(started) do if name == "a" then a = a + 1 end end
        t.eq(a, 1, "one probe of the hanging peer: " .. table.concat(started, ","))
        t.ok(#started >= 2 + math.floor(pool_mod.PROBE_DEADLINE / health.PROBE_EVERY) - 1, table.concat(started, ","))
        -- a worker killed mid-probe never says it ended: its lock lapses after PROBE_HOLD
        dict.clock = pool_mod.PROBE_HOLD + 0.01
        pool_mod.probes(pool, dict.clock, start)
        t.eq(started[#started - 1] == "a" or started[#started] == "a", true, table.concat(started, ","))
    end,

    ["mark reports when usability changes"] = function(t)
        local dict = fakedict.new()
        local pool = new_pool(dict)
        install(pool, 1, { "peer a 127.0.0.1 1 20 0 64 0" }, 1)
        local _, moved = pool_mod.mark(pool, "a", health.on_failure, 1)
        t.eq(moved, true)
        _, moved = pool_mod.mark(pool, "a", health.on_failure, 1.1)
        t.eq(moved, false, "already out")
        local ver = dict:get("ver")
        _, moved = pool_mod.mark(pool, "a", health.on_success, 1.2)
        t.eq(moved, true); t.eq(dict:get("ver"), ver + 1)
    end,

    ["a probe result that changes nothing leaves ver alone; one that changes what workers read moves it"] = function(t)
        local dict, pool, worker = two_workers({ "peer a 127.0.0.1 1 20 0 64 0" }, 1)
        local function probe(ok, at)
            return pool_mod.mark(pool, "a", function(h, n) return health.on_probe(h, ok, n) end, at)
        end
        -- deep in a back-off: level 5 (five episodes of failures, /health 200 between them: flapping), out
        -- until 9, and no probe 200 seen yet
        pool_mod.mark(pool, "a", function() return { out = true, level = 5, till = 9, changed = 1, ok_at = 0 } end, 1)
        pool_mod.sync(worker, 1.1)
        local ver, rec = dict:get("ver"), dict:get("h:a")
        -- a flapping peer's probe 200 before its back-off ends: only ok_at would change: nothing is written
        -- (written unannounced it could put back an older record over another worker's newer one), but for the
        -- record's first 200, once (fdngx.health.usable reads whether there was one)
        probe(true, 2.5)
        t.eq(dict:get("ver"), ver + 1, "the record's first 200")
        ver, rec = dict:get("ver"), dict:get("h:a")
        probe(true, 3)
        t.eq(dict:get("ver"), ver, "a 200 that does not bring it back")
        t.eq(dict:get("h:a"), rec, "and nothing written")
        -- a failed probe: down, not flapping; its level comes down to FLAP_LEVEL once (news: its next 200
        -- brings it back), and the next failed probe of a peer already held out for longer changes nothing
        probe(false, 3.2)
        t.eq(dict:get("ver"), ver + 1, "the level down, once")
        t.eq(pool_mod.sync(worker, 3.2), true)
        t.eq(worker.by_name.a.h.level, health.FLAP_LEVEL)
        ver, rec = dict:get("ver"), dict:get("h:a")
        probe(false, 3.5)
        t.eq(dict:get("ver"), ver, "a failed probe of a peer already held out for longer")
        t.eq(dict:get("h:a"), rec, "and nothing written")
        t.eq(pool_mod.sync(worker, 3.5), false, "no worker re-reads")
        -- once its back-off has ended, a 200 clears the flag (fdngx.health.usable reads it): every worker
        probe(true, 10)
        t.eq(dict:get("ver"), ver + 1)
        t.eq(pool_mod.sync(worker, 10), true)
        t.eq(worker.by_name.a.h.out, false)
        -- a request succeeds (the back-off starts over), one is refused, a probe answers 200: each is news
        pool_mod.mark(pool, "a", health.on_success, 10.2)
        t.eq(dict:get("ver"), ver + 2)
        local _, moved = pool_mod.mark(pool, "a", health.on_failure, 10.5)
        t.eq(moved, true); t.eq(dict:get("ver"), ver + 3)
        _, moved = probe(true, 10.6)
        t.eq(moved, true); t.eq(dict:get("ver"), ver + 4)
        pool_mod.sync(worker, 10.6)
        t.ok(health.usable(worker.by_name.a.h, false, 0, 10.6))
        -- an up peer the sidecar holds down: its 200s change nothing workers read, the first failure does
        install(pool, 2, { "peer a 127.0.0.1 1 20 1 64 0" }, 11)
        pool_mod.sync(worker, 11)
        ver = dict:get("ver")
        for i = 1, 8 do probe(true, 11 + i * 0.25) end
        t.eq(dict:get("ver"), ver, "200s from a peer the balancer already has in")
        probe(false, 14)
        t.eq(dict:get("ver"), ver + 1, "a failed probe takes it out")
        pool_mod.sync(worker, 14)
        t.ok(health.balancer_out(worker.by_name.a.h, 14))
    end,

    ["a peer that stays down moves ver once per hold, not at every probe; every worker holds it out"] = function(t)
        local dict, pool, worker = two_workers({ "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 100)
        pool_mod.mark(pool, "a", health.on_failure, 100) -- a refused connection: out for 0.5 s
        local ver = dict:get("ver")
        -- 30 s down: the probes (every 0.25 s) fail; the worker syncs every 0.1 s (its timer) or per request
        local probes, at = 0, 100
        for step = 1, 300 do
            at = 100 + step * 0.1
            -- a probe every 0.25 s on average (0.2 and 0.3 s apart in turn)
            if math.floor(at * 4 + 1e-6) ~= math.floor((at - 0.1) * 4 + 1e-6) then
                pool_mod.mark(pool, "a", function(h, n) return health.on_probe(h, false, n) end, at)
                probes = probes + 1
            end
            pool_mod.sync(worker, at)
            t.ok(not health.usable(worker.by_name.a.h, false, 0, at), "held out in every worker at " .. at)
            t.ok(not health.usable(worker.by_name.a.h, false, 0, at + 0.1), "until its next sync, too")
        end
        local moves = dict:get("ver") - ver
        t.ok(probes >= 115, "probed " .. probes .. " times")
        t.ok(moves <= 30 / (health.HOLD_FOR - health.HOLD) + 1, "ver moved " .. moves .. " times in 30 s")
        -- and the first 200 brings it back in every worker
        pool_mod.mark(pool, "a", function(h, n) return health.on_probe(h, true, n) end, at + 0.05)
        pool_mod.sync(worker, at + 0.05)
        t.ok(health.usable(worker.by_name.a.h, false, 0, at + 0.05))
    end,

    ["every peer out, every request failing (fail-open): ver moves once per half back-off, not per request"] = function(t)
        local dict, pool, worker = two_workers({ "peer a 127.0.0.1 1 20 0 64 0", "peer b 127.0.0.1 2 20 0 64 0" }, 100)
        local ver = dict:get("ver")
        -- 20 s of a total outage at 100 requests a second, each failing on a or b in turn
        for i = 1, 2000 do
            local at = 100 + i * 0.01
            pool_mod.mark(pool, i % 2 == 0 and "a" or "b", health.on_failure, at)
            pool_mod.sync(worker, at)
            t.ok(not health.usable(worker.by_name.a.h, false, 0, at) or i < 2, "a held out at " .. at)
        end
        local moves = dict:get("ver") - ver
        -- per peer: 5 steps up the back-off, then one move per MAX / 2 (4 s) at most
        t.ok(moves <= 2 * (health.MAX_LEVEL + 20 / (health.MAX / 2) + 1), "ver moved " .. moves .. " times")
        t.eq(health.decode(dict:get("h:a")).level, health.MAX_LEVEL, "the level stops where the back-off does")
        -- the first probe 200 still brings a back (its level is past FLAP_LEVEL: once its back-off has ended)
        local h = health.decode(dict:get("h:a"))
        pool_mod.mark(pool, "a", function(rec, n) return health.on_probe(rec, true, n) end, h.till)
        pool_mod.sync(worker, h.till)
        t.ok(health.usable(worker.by_name.a.h, false, 0, h.till))
    end,

    ["after a sync a worker's health copy is the shared record, whatever the events"] = function(t)
        local dict, pool, worker = two_workers({ "peer a 127.0.0.1 1 20 0 64 0" }, 1)
        local events = {
            health.on_failure, health.on_success,
            function(h, n) return health.on_probe(h, true, n) end,
            function(h, n) return health.on_probe(h, false, n) end,
        }
        local seed, at = 12345, 1
        local function rand(n) seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n + 1 end
        for _ = 1, 2000 do
            at = at + rand(20) * 0.05
            pool_mod.mark(pool, "a", events[rand(4)], at)
            pool_mod.sync(worker, at)
            local mine, shared = worker.by_name.a.h, health.decode(dict:get("h:a"))
            t.ok(not health.differs(mine, shared), "at " .. at .. ": " .. health.encode(mine) .. " vs "
                 .. health.encode(shared))
        end
    end,
}
