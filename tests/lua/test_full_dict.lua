-- fdngx.pool and fdngx.ledger against a shared dict that is full (nginx's semantics: tests/lua/fulldict.lua).
-- An outside review (2026-12-06) measured on the real nginx: a push the 16m zone had no room for deleted the
-- snapshot in force (every worker started afterwards had no peers: 503), and plain set/incr evicted the
-- shares of long requests, whose totals then never came down.
local pool_mod = require("fdngx.pool")
local peers = require("fdngx.peers")
local ledger = require("fdngx.ledger")
local fulldict = require("fulldict")
local health = require("fdngx.health")

local function text_of(gen, n, width)
    local lines = { "generation " .. gen }
    for i = 1, n do
        lines[#lines + 1] = string.format("peer %s 127.0.0.1 %d 10 0 64 0.000",
            (string.format("r%05d.", i) .. string.rep("x", width)):sub(1, width), 20000 + i)
    end
    return table.concat(lines, "\n") .. "\n"
end

local function install(pool, text, now)
    return pool_mod.install(pool, text, assert(peers.parse(text)), now)
end

-- A pool on a dict of `budget` bytes.
local function pool_of(budget)
    local dict = fulldict.new(budget)
    return { name = "fastdeploy", zone = "fdngx_fastdeploy", dict = dict }, dict
end

-- What the dict holds now (to compare with later).
local function keys_of(dict)
    local kept = {}
    for k, v in pairs(dict.data) do kept[k] = v end
    return kept
end

return {
    ["a push the dict has no room for keeps the snapshot in force (a new worker still has every peer)"] = function(t)
        local pool, dict = pool_of(74000)
        t.ok(install(pool, text_of(1, 100, 100), 0))
        local before = keys_of(dict)
        local added, err, why = install(pool, text_of(2, 200, 100), 1) -- the fleet grew: no room for it
        t.eq(added, nil, "the install must fail")
        t.eq(why, "full")
        t.ok(err:find("shared dict fdngx_fastdeploy is full (no memory", 1, true), err)
        t.ok(err:find("lua_shared_dict", 1, true), err)
        for k, v in pairs(before) do t.eq(dict.data[k], v, "key " .. k .. " untouched") end
        t.eq(#dict.evicted, 0, "nothing evicted")
        -- what a worker started now (a crash respawn, or a reload's init) reads
        local fresh = { name = "fastdeploy", dict = dict }
        t.ok(pool_mod.sync(fresh, 2, true))
        t.eq(#fresh.peers, 100, "the snapshot in force (generation 1) is kept whole")
        t.eq(dict:get("gen"), 1)
        -- a smaller fleet fits again, and replaces it (the old text goes)
        t.ok(install(pool, text_of(3, 30, 100), 3))
        t.eq(dict:get("gen"), 3); t.eq(dict:get("snap:1"), nil)
        t.ok(pool_mod.sync(fresh, 4)); t.eq(#fresh.peers, 30)
    end,

    ["a full dict never drops a worker's in-flight share (its total would never come down)"] = function(t)
        local dict = fulldict.new(30000)
        local pool = { name = "fastdeploy", dict = dict }
        t.ok(install(pool, text_of(1, 20, 60), 0))
        local l = ledger.new(dict, "123.456")
        local names, counted = {}, {}
        for _, p in ipairs(assert(peers.parse((pool_mod.text(dict)))).peers) do
            names[#names + 1] = p.name
            counted[p.name] = l:acquire(p.name)
        end
        -- long streams: their shares were written at acquire; pushes since touched everything else
        t.ok(install(pool, text_of(2, 20, 60), 1))
        dict:get("gen"); dict:get("ver")
        for _, n in ipairs(names) do dict:get("i:" .. n) end -- every pick reads every candidate's total
        -- the dict fills (more peers' counters, other workers' shares): some are refused, none evicts
        local refused = 0
        local other = ledger.new(dict, "999.1")
        for i = 1, 280 do if not other:acquire("filler" .. i) then refused = refused + 1 end end
        t.ok(refused > 0, "the dict filled up")
        t.eq(#dict.evicted, 0, "nothing evicted")
        for _, n in ipairs(names) do if counted[n] then l:release(n) end end
        local stuck = 0
        for _, n in ipairs(names) do if (dict:get("i:" .. n) or 0) > 0 then stuck = stuck + 1 end end
        t.eq(stuck, 0, "in-flight totals left above 0 after every request ended")
    end,

    ["an uncounted request leaves the counts as they were"] = function(t)
        local dict = fulldict.new(200)
        local l = ledger.new(dict, "1.1")
        t.ok(l:acquire("a"), "room for one share and one total")
        local before = dict:get("i:a")
        t.eq(l:acquire("b"), nil, "no room for b's")
        t.eq(dict:get("o:1.1:b"), nil, "b's share rolled back"); t.eq(dict:get("i:b"), nil)
        t.eq(dict:get("i:a"), before, "a's count stays")
        t.ok(l:acquire("a"), "a's counters exist: counted in place")
        t.eq(dict:get("i:a"), 2)
    end,
    ["a push refused part-way leaves no key of a peer it would have added (nothing sweeps x:/sa:)"] = function(t)
        local pool, dict = pool_of(1e7)
        t.ok(install(pool, text_of(1, 5, 20), 0))
        local in_force = keys_of(dict)
        local text2 = text_of(2, 25, 20) -- 20 peers more
        -- room for its text and three small keys: refused at the 4th key of a new peer
        dict.budget = dict.used + (#"snap:2" + #text2 + 64) + 3 * 100
        local added, err, why = install(pool, text2, 1)
        t.eq(added, nil, "refused"); t.eq(why, "full")
        t.ok(err:find("nothing applied", 1, true), err)
        for k in pairs(dict.data) do
            t.ok(in_force[k] ~= nil, "key " .. k .. " written by a push that was refused ('nothing applied')")
        end
        t.eq(dict:get("snap_at"), in_force["snap_at"], "snap_at")
    end,

    ["an older fdngx's `snap` key of the generation in force is read (an upgrade by reload)"] = function(t)
        -- 8ae71cd's layout: `gen` and one `snap` key. Old workers write it until they stop (a push they took
        -- while the new master's init ran); the new init reads it to keep a newer push than the peers file.
        local dict = fulldict.new(1e7)
        local old = text_of(7, 3, 20)
        dict:set("snap", old); dict:set("gen", 7); dict:set("ver", 3)
        local text, gen = pool_mod.text(dict)
        t.eq(text, old, "the snapshot in force"); t.eq(gen, 7)
        local w = { name = "fastdeploy", dict = dict }
        t.ok(pool_mod.sync(w, 1, true), "a new worker has the peers in force")
        t.eq(#w.peers, 3)
        -- and one whose generation is not `gen` is not taken for it
        dict:set("gen", 8)
        t.eq(pool_mod.text(dict), nil)
    end,

    ["a health mark in a full dict is written in place, never lost (records have one width)"] = function(t)
        local pool, dict = pool_of(1e7)
        t.ok(install(pool, text_of(1, 3, 20), 0))
        t.ok(pool_mod.sync(pool, 0, true))
        local name = pool.peers[1].name
        pool_mod.mark(pool, name, health.on_failure, 5)
        local before = dict:get("h:" .. name)
        t.ok(before, "a record")
        dict.budget = dict.used -- full
        local h = pool_mod.mark(pool, name, health.on_failure, 1000) -- a longer back-off, later times
        local after = dict:get("h:" .. name)
        t.ok(after and #after == #before, "kept: " .. tostring(after))
        t.eq(health.decode(after).level, 2, "the new record, in place"); t.eq(h.level, 2)
    end,
}
