-- fdngx.pick: least (in flight + external) / capacity weight, p2c, fail open.
local pick = require("fdngx.pick")

local function peers(spec)
    local out = {}
    for i, w in ipairs(spec) do out[i] = { name = "p" .. i, weight = w, ext = 0 } end
    return out
end

local function yes() return true end

-- Send n requests that never finish: each lands on the lowest score; returns the count per peer.
local function fill(mode, list, n, seed)
    math.randomseed(seed or 1)
    local inflight, counts, scratch = {}, {}, {}
    local function load(p) return inflight[p.name] or 0 end
    for _ = 1, n do
        local p = pick.choose(mode, list, {}, yes, load, math.random, scratch)
        inflight[p.name] = (inflight[p.name] or 0) + 1
        counts[p.name] = (counts[p.name] or 0) + 1
    end
    return counts
end

return {
    ["least: the lowest score wins"] = function(t)
        local list = peers({ 20, 20, 20 })
        local inflight = { p1 = 3, p2 = 1, p3 = 2 }
        local p = pick.choose("least", list, {}, yes, function(q) return inflight[q.name] end, math.random, {})
        t.eq(p.name, "p2")
    end,

    ["capacity: a half-slots replica (half the weight) gets half the requests from the first ones"] = function(t)
        local counts = fill("least", peers({ 20, 10, 20 }), 50)
        t.eq(counts.p1, 20); t.eq(counts.p2, 10); t.eq(counts.p3, 20)
    end,

    ["idle ties follow the weights exactly, in nginx's smooth weighted round robin"] = function(t)
        math.randomseed(7)
        local list, counts, scratch = peers({ 1, 3 }), { p1 = 0, p2 = 0 }, {}
        for _ = 1, 4000 do
            local p = pick.choose("least", list, {}, yes, function() return 0 end, math.random, scratch)
            counts[p.name] = counts[p.name] + 1
        end
        t.near(counts.p2, 3000, 1)
    end,

    ["equal loads go round: never the same peer twice while an equal one waits"] = function(t)
        math.randomseed(11)
        local list, scratch = peers({ 20, 20, 20, 20 }), {}
        local last, counts = nil, {}
        for i = 1, 400 do
            local p = pick.choose("least", list, {}, yes, function() return 0 end, math.random, scratch)
            t.ok(p ~= last, "pick " .. i .. " repeats " .. p.name)
            counts[p.name] = (counts[p.name] or 0) + 1
            last = p
        end
        for i = 1, 4 do t.eq(counts["p" .. i], 100, "p" .. i) end
        -- only the equals take part: a loaded peer is skipped, the others still rotate
        local inflight = { p1 = 0, p2 = 5, p3 = 0, p4 = 0 }
        local seen = {}
        for _ = 1, 3 do
            local p = pick.choose("least", list, {}, yes, function(q) return inflight[q.name] end, math.random, scratch)
            t.ok(p.name ~= "p2"); t.ok(not seen[p.name], "each of the three once"); seen[p.name] = true
        end
    end,

    ["a free slot beats a queue, whatever the weights"] = function(t)
        -- three fast replicas (weight 20) full, a half-speed one (weight 10) with free slots
        local list = peers({ 20, 20, 20, 10 })
        for _, p in ipairs(list) do p.capacity = 16 end
        local inflight = { p1 = 16, p2 = 16, p3 = 16, p4 = 10 }
        local p = pick.choose("least", list, {}, yes, function(q) return inflight[q.name] end, math.random, {})
        t.eq(p.name, "p4") -- by load / weight alone: 0.8 against 1.0, a fast one (and a queued request)
        t.ok(pick.score(list[4], 10) < pick.score(list[1], 16), "free below full")
        t.eq(pick.score(list[4], 15), 1.5)
        t.eq(pick.score(list[4], 16), pick.FULL + 0.1)
    end,

    ["slots fill by weight, then every slot, then queues by weight"] = function(t)
        local list = peers({ 20, 20, 20, 10 })
        for _, p in ipairs(list) do p.capacity = 16 end
        -- 64 slots: the slow one takes half the in-flight of a fast one while all have room, then the rest of
        -- its slots before anything queues; 14 more queue 4, 4, 4 and 2 (each queue per weight <= 0.2)
        local counts = fill("least", list, 56)
        t.eq(counts.p1, 16); t.eq(counts.p2, 16); t.eq(counts.p3, 16); t.eq(counts.p4, 8)
        counts = fill("least", list, 64)
        t.eq(counts.p1, 16); t.eq(counts.p2, 16); t.eq(counts.p3, 16); t.eq(counts.p4, 16)
        counts = fill("least", list, 78)
        t.eq(counts.p1, 20); t.eq(counts.p2, 20); t.eq(counts.p3, 20); t.eq(counts.p4, 18)
    end,

    ["p2c: a drawn peer with a free slot beats a drawn full one"] = function(t)
        local list = peers({ 20, 20, 10 })
        for _, p in ipairs(list) do p.capacity = 16 end
        local inflight = { p1 = 16, p2 = 16, p3 = 10 }
        math.randomseed(9)
        local hits = 0
        for _ = 1, 3000 do
            if pick.p2c(list, 3, function(q) return inflight[q.name] end, math.random).name == "p3" then
                hits = hits + 1
            end
        end
        -- p3 wins every draw it is in: 1 - 2 * (20/50 * 20/30) = 0.467 of them
        t.near(hits / 3000, 0.467, 0.03, "p3 share")
    end,

    ["equal capacities and weights: the score orders as load / weight"] = function(t)
        math.randomseed(13)
        for _ = 1, 500 do
            local list = peers({ 20, 20, 20, 20 })
            local inflight = {}
            for _, p in ipairs(list) do p.capacity = 8; inflight[p.name] = math.random(0, 12) end
            local p = pick.choose("least", list, {}, yes, function(q) return inflight[q.name] end, math.random, {})
            for _, q in ipairs(list) do t.ok(inflight[p.name] <= inflight[q.name], "lowest load picked") end
        end
    end,

    ["external load counts in whole requests"] = function(t)
        t.eq(pick.external(0.49, 100, 100), 0)
        t.eq(pick.external(0.5, 100, 100), 1)
        t.eq(pick.external(2.4, 100, 100), 2)
        t.eq(pick.external(3, 100, 100 + pick.STALE_AFTER / 2), 2) -- 1.5 after half the fade
        t.eq(pick.external(nil, 100, 100), 0)
    end,

    ["external load steers, and fades over STALE_AFTER"] = function(t)
        t.eq(pick.faded(10, 100, 100), 10)
        t.eq(pick.faded(10, 100, 105), 5)
        t.eq(pick.faded(10, 100, 100 + pick.STALE_AFTER), 0)
        t.eq(pick.faded(0, 100, 101), 0)
        local list = peers({ 20, 20 })
        list[1].ext = 50
        local p = pick.choose("least", list, {}, yes, function(q) return q.ext end, math.random, {})
        t.eq(p.name, "p2")
    end,

    ["others: the external load, plus F - 1 times this nginx's own change since the push"] = function(t)
        t.eq(pick.others(2.4, 5, 3, 1, 100, 100.5), 2, "one frontend: the external load alone")
        t.eq(pick.others(2.4, 5, 3, 4, 100, 100.5), 8, "three others moved by +2 each")
        t.eq(pick.others(2.4, 3, 5, 4, 100, 100.5), 0, "they ended as many: never below 0")
        t.eq(pick.others(9, 3, 5, 2, 100, 100), 7)
        t.eq(pick.others(0, 4, nil, 4, 100, 100), 0, "no count at the push: no change")
        t.eq(pick.others(0, 4, 1, nil, 100, 100), 0, "no frontends said: one")
        -- the external load fades as before; the others' change counts whole until the snapshot is
        -- STALE_AFTER old (pushes stopped), then not at all
        t.eq(pick.others(4, 5, 3, 4, 100, 100 + pick.STALE_AFTER / 2), 8)
        t.eq(pick.others(4, 5, 3, 4, 100, 100 + pick.STALE_AFTER - 0.01), 6)
        t.eq(pick.others(4, 5, 3, 4, 100, 100 + pick.STALE_AFTER), 0)
    end,

    ["four frontends acting on one snapshot spread their requests instead of herding"] = function(t)
        -- One push: p1 idle, p2..p4 at 4 each (every frontend's requests included). Then 4 frontends take
        -- 4 requests each, in turns, none ending before the next push. Each frontend counts its own in
        -- flight and the pushed load; the others' requests since the push it can only infer.
        local function run(frontends)
            local pushed = { p1 = 0, p2 = 4, p3 = 4, p4 = 4 }
            local own, total, scratch = {}, { p1 = 0, p2 = 4, p3 = 4, p4 = 4 }, {}
            local lists = {}
            for f = 1, 4 do
                own[f] = { p1 = 0, p2 = 1, p3 = 1, p4 = 1 } -- at the push, each had one on p2..p4
                lists[f] = peers({ 20, 20, 20, 20 })
                for _, p in ipairs(lists[f]) do
                    p.ext, p.at_push = pushed[p.name] - own[f][p.name], own[f][p.name]
                end
            end
            math.randomseed(7)
            for _ = 1, 4 do
                for f = 1, 4 do
                    local mine = own[f]
                    local function load(p)
                        return mine[p.name] + pick.others(p.ext, mine[p.name], p.at_push, frontends, 100, 100.5)
                    end
                    local p = pick.choose("least", lists[f], {}, yes, load, math.random, scratch)
                    mine[p.name] = mine[p.name] + 1
                    total[p.name] = total[p.name] + 1
                end
            end
            return total
        end
        local herd, spread = run(1), run(4)
        t.eq(herd.p1, 16, "without the frontends count every frontend sends all four to p1")
        -- with it each sends one to p1, which then looks as loaded as the rest (its own +1 counted 4 times),
        -- and the other three to three different peers (each then counts +4): no peer past 8 (7 is level),
        -- whatever the tie-breaks
        for name, n in pairs(spread) do t.ok(n >= 4 and n <= 8, name .. ": " .. n) end
    end,

    ["p2c: never the worse of its two draws, and spreads over many peers"] = function(t)
        local list = peers({ 20, 20, 20, 20 })
        local counts = fill("p2c", list, 400, 3)
        for i = 1, 4 do t.near(counts["p" .. i], 100, 25, "p" .. i) end
        -- the most loaded peer is never chosen while it is strictly the worst
        local inflight = { p1 = 9, p2 = 1, p3 = 1, p4 = 1 }
        math.randomseed(5)
        for _ = 1, 200 do
            local p = pick.p2c(list, 4, function(q) return inflight[q.name] end, math.random)
            t.ok(p.name ~= "p1")
        end
    end,

    ["p2c draws in proportion to weight"] = function(t)
        math.randomseed(11)
        local list, hits = peers({ 30, 10, 10, 10 }), 0
        for _ = 1, 6000 do
            if pick.p2c(list, 4, function() return 0 end, math.random).name == "p1" then hits = hits + 1 end
        end
        t.ok(hits / 6000 > 0.4 and hits / 6000 < 0.6, "p1 share " .. hits / 6000)
    end,

    ["retries skip tried peers; all unusable fails open; all tried gives nil"] = function(t)
        local list = peers({ 1, 1, 1 })
        local zero = function() return 0 end
        local p = pick.choose("least", list, { p1 = true, p3 = true }, yes, zero, math.random, {})
        t.eq(p.name, "p2")
        local none = function() return false end
        p = pick.choose("least", list, { p1 = true }, none, zero, math.random, {}, yes)
        t.ok(p and p.name ~= "p1", "fail open among the untried")
        t.eq(pick.choose("least", list, { p1 = true }, none, zero, math.random, {}), nil) -- no fallback
        t.eq(pick.choose("p2c", list, { p1 = true, p2 = true, p3 = true }, yes, zero, math.random, {}), nil)
        local usable = function(q) return q.name == "p3" end
        for _ = 1, 20 do t.eq(pick.choose("p2c", list, {}, usable, zero, math.random, {}).name, "p3") end
    end,

    ["fail open only over what the fallback accepts: none usable after a 429, not out when broken"] = function(t)
        local list = peers({ 1, 1, 1 })
        local zero = function() return 0 end
        local usable = function(q) return q.name == "p1" or q.name == "p2" end -- p3 held down
        local not_out = function(q) return q.name ~= "p2" end -- p2 out by the balancer's own evidence
        for _, mode in ipairs({ "least", "p2c" }) do
            -- after a 429 (no fallback): a usable one, else nothing
            t.eq(pick.choose(mode, list, { p1 = true }, usable, zero, math.random, {}).name, "p2")
            t.eq(pick.choose(mode, list, { p1 = true, p2 = true }, usable, zero, math.random, {}), nil)
            -- after a broken attempt: fail open onto the one held down by the sidecar alone
            t.eq(pick.choose(mode, list, { p1 = true, p2 = true }, usable, zero, math.random, {}, not_out).name, "p3")
            -- but never onto one the balancer itself has out
            local none = function() return false end
            for _ = 1, 10 do
                local p = pick.choose(mode, list, {}, none, zero, math.random, {}, not_out)
                t.ok(p and p.name ~= "p2", "not the out one")
            end
            t.eq(pick.choose(mode, list, { p1 = true, p3 = true }, none, zero, math.random, {}, not_out), nil)
        end
    end,

    ["a large pool: least among 16 drawn, each drawn once; up to 64 every load is read"] = function(t)
        math.randomseed(7)
        t.eq(pick.SAMPLE_ABOVE, 64)
        t.eq(pick.SAMPLE, 16)
        for _, n in ipairs({ 3, 64, 65, 1000, 5000 }) do
            local list = peers({})
            for i = 1, n do list[i] = { name = "p" .. i, weight = 20, ext = 0 } end
            local reads, seen = 0, {}
            local function load(p)
                reads = reads + 1
                t.ok(not seen[p.name], "each candidate read once")
                seen[p.name] = true
                return 1
            end
            t.ok(pick.choose("least", list, {}, yes, load, math.random, {}) ~= nil, "a pick")
            t.eq(reads, n > 64 and 16 or n)
        end
    end,

    ["sample: d distinct candidates in front, the rest kept (a permutation), any of them drawable"] = function(t)
        math.randomseed(3)
        local drawn = {}
        for _ = 1, 400 do
            local cands = {}
            for i = 1, 100 do cands[i] = { name = i } end
            t.eq(pick.sample(cands, 100, 16, math.random), 16)
            local names = {}
            for i = 1, 100 do
                t.ok(not names[cands[i].name], "no candidate twice")
                names[cands[i].name] = true
            end
            for i = 1, 16 do drawn[cands[i].name] = true end
        end
        for i = 1, 100 do t.ok(drawn[i], "candidate " .. i .. " drawn at least once in 400 picks") end
        -- the float edge: a rand() of just below 1 still lands inside
        local cands = { { name = 1 }, { name = 2 }, { name = 3 } }
        pick.sample(cands, 3, 3, function() return 0.9999999999999999 end)
        t.ok(cands[1] and cands[2] and cands[3], "no hole")
    end,

    ["a large pool stays balanced, by weight: requests that never end, least of 16 drawn"] = function(t)
        -- 1,000 peers, the odd ones of twice the weight; 15,000 requests (10 per unit of weight share)
        local list = {}
        for i = 1, 1000 do list[i] = { name = "p" .. i, weight = i % 2 == 1 and 20 or 10, ext = 0 } end
        local counts = fill("least", list, 15000, 11)
        local lo, hi = { math.huge, math.huge }, { 0, 0 }
        for i = 1, 1000 do
            local c, k = counts["p" .. i] or 0, i % 2 + 1 -- k 2: odd (weight 20), 1: even (weight 10)
            lo[k], hi[k] = math.min(lo[k], c), math.max(hi[k], c)
        end
        -- all of them: weight 20 -> 20 each, weight 10 -> 10 each; the least of all gives exactly that
        t.ok(lo[2] >= 19 and hi[2] <= 21, "weight 20: " .. lo[2] .. ".." .. hi[2])
        t.ok(lo[1] >= 9 and hi[1] <= 11, "weight 10: " .. lo[1] .. ".." .. hi[1])
    end,
}
