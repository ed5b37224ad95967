-- fdngx.pick: which peer takes the next request (pure Lua: no ngx, testable with luajit).
--
-- One formula, lowest wins, for a peer carrying `load` requests (in flight from this nginx + external load):
--
--     score = load / weight                          while a slot is free (load < capacity)
--     score = FULL + (load + 1 - capacity) / weight  when every slot is taken
--
-- * in flight: requests this nginx (all workers) has open on the peer right now (fdngx.ledger).
-- * external load: what the sidecar last scraped there (running + queued) minus what this nginx had in
--   flight at that moment, i.e. load from other frontends and clients, smoothed across pushes
--   (fdngx.pool); it fades linearly to 0 over STALE_AFTER seconds, so an old scrape cannot steer for long.
-- * the other frontends' requests since that push (M.others): one controller pushes the same snapshot to F
--   frontends (the snapshot's `frontends`), and between pushes each knows only its own requests. F - 1 times
--   this nginx's own change on the peer since the push (in flight now minus in flight at the push) counts as
--   theirs: they see the same snapshot and take the same share of the traffic, so they moved as this one
--   did. Without it every frontend turned to the peer the snapshot shows least loaded and F of them sent it
--   F times what each meant to (measured: docs/benchmarks.md, "Several frontends: the others' requests since
--   the push"). F = 1 (a sidecar of its own, a peers file) adds nothing.
-- * weight: the peer's share, and it ALREADY carries capacity: fdngx writes weight = 20 * slots * static
--   weight / the largest (slots * static weight) into the peers file, and the sidecar pushes the policy's
--   weights, which are the same capacity weights times speed (and recovery ramp). So a replica with half
--   the slots has half the weight and gets half the requests from the very first one, before any push.
--   Capacity is never multiplied into the score again (that would count it twice); the slot count in the
--   snapshot only says whether a slot is free (below).
-- * a free slot first: a request sent to a peer whose slots are all taken waits in its queue, one sent to a
--   peer with a free slot starts at once, whatever their weights. Among peers with a free slot the weight
--   decides (a slower replica, at a lower weight, runs fewer requests and each ends sooner); among full ones
--   the queue ahead of the request per weight, i.e. how long it waits (a queue drains at the peer's slots
--   times its speed, which is what the weight carries). Without this, the speed factor in the weights kept
--   a half-speed replica's slots free while the fast ones queued in a burst (bench.lb half-speed: 3.9
--   requests waiting on the fast three for 0.2 on the slow one; that window's p99 TTFT 1.9x the median
--   window's). FULL is above every free-slot score (load < capacity <= 1000000, weight >= 1). Where every
--   peer has the same capacity and weight it orders them exactly as load / weight does.
--
-- External load counts in whole requests (M.external), like the in-flight count: a fraction is scrape
-- timing (a request that ended between the scrape and the push), and it would break every tie.
--
-- least: the lowest score over every usable peer (nginx's weighted least_conn, plus the external load;
-- over SAMPLE of them in a large pool, below);
-- ties (an idle pool, or equal loads) go round in nginx's smooth weighted round robin, as nginx's least_conn
-- spreads them: in proportion to weight, and the peer picked least recently first, so two requests in a row
-- do not land on one replica while another equal one waits (each worker keeps its own rotation, p.cw).
-- A large pool (more than SAMPLE_ABOVE usable candidates): least among SAMPLE of them drawn at random, not
-- over all. Every candidate's load is a shared-dict read, so a pick over all of them grew with the fleet (a
-- request 0.26 ms slower at 1,000 replicas than at 2, 0.49 ms at 2,000: python -m bench.pick); sampled it
-- costs the same at any size (+0.05-0.07 ms). For a large fleet the least loaded of 16 random replicas is
-- about as good as the least of all ("power of d choices": a replica with no free slot is picked only when
-- all 16 drawn are as full; tests/lua/test_pick.lua fills 1,000). Uniform draws: the score divides by
-- weight, so a replica with twice the weight still takes twice the requests.
-- p2c: two distinct peers drawn with probability proportional to weight, the lower score wins (meant
-- against herding when several frontends act on the same snapshot; measured worse than least there:
-- docs/benchmarks.md).

local M = {}

local floor = math.floor

M.STALE_AFTER = 10.0
M.SAMPLE_ABOVE = 64
M.SAMPLE = 16
M.FULL = 1e7
local EPS = 1e-9

-- The score of peer `p` (weight, capacity) carrying `load` requests; lowest wins (see the top).
function M.score(p, load)
    local cap = p.capacity
    if cap and load >= cap then return M.FULL + (load + 1 - cap) / p.weight end
    return load / p.weight
end

-- External load `ext` pushed at `pushed_at`, as it counts at `now`.
function M.faded(ext, pushed_at, now)
    if not ext or ext <= 0 then return 0 end
    local age = now - pushed_at
    if age <= 0 then return ext end
    if age >= M.STALE_AFTER then return 0 end
    return ext * (1 - age / M.STALE_AFTER)
end

-- External load `ext` pushed at `pushed_at`, in whole requests at `now` (half a request or more is one).
function M.external(ext, pushed_at, now)
    return floor(M.faded(ext, pushed_at, now) + 0.5)
end

-- What the others (other frontends, clients going direct) have on a peer at `now`, in whole requests, never
-- below 0: the pushed external load `ext` (M.external) plus `frontends` - 1 times this nginx's own change
-- since the push (`own` in flight now, `own_at_push` then), the latter while the snapshot is younger than
-- STALE_AFTER (after that, pushes stopped: this nginx balances its own requests, as least_conn does).
function M.others(ext, own, own_at_push, frontends, pushed_at, now)
    local x = M.external(ext, pushed_at, now)
    if (frontends or 1) > 1 and now - pushed_at < M.STALE_AFTER then
        x = x + (frontends - 1) * (own - (own_at_push or own))
    end
    return x > 0 and x or 0
end

function M.least(cands, n, load, rand)
    local best, best_score, ties = nil, 0, 0
    for i = 1, n do
        local p = cands[i]
        local s = M.score(p, load(p))
        p.sc = s
        if best == nil or s < best_score - EPS then
            best, best_score, ties = p, s, 1
        elseif s <= best_score + EPS then
            ties = ties + 1
        end
    end
    if ties < 2 then return best, best_score end
    -- Smooth weighted round robin among the equals (nginx's ngx_http_upstream_get_least_conn_peer): each
    -- gains its weight, the one ahead wins and falls back by their total. A peer first seen starts at a
    -- random point of its turn, so workers (and peers added later) do not move in step.
    local total, top = 0, nil
    for i = 1, n do
        local p = cands[i]
        if p.sc <= best_score + EPS then
            p.cw = (p.cw or rand() * p.weight) + p.weight
            total = total + p.weight
            if top == nil or p.cw > top.cw then top = p end
        end
    end
    top.cw = top.cw - total
    return top, best_score
end

-- Index of a weight-proportional random candidate, never `skip`; `total` excludes skip's weight.
local function weighted(cands, n, total, rand, skip)
    local r = rand() * total
    for i = 1, n do
        if i ~= skip then
            r = r - cands[i].weight
            if r < 0 then return i end
        end
    end
    for i = n, 1, -1 do -- float round-off left r at 0: the last eligible one
        if i ~= skip then return i end
    end
end

function M.p2c(cands, n, load, rand)
    if n <= 2 then return M.least(cands, n, load, rand) end
    local total = 0
    for i = 1, n do total = total + cands[i].weight end
    local a = weighted(cands, n, total, rand)
    local b = weighted(cands, n, total - cands[a].weight, rand, a)
    local pa, pb = cands[a], cands[b]
    local sa, sb = M.score(pa, load(pa)), M.score(pb, load(pb))
    if sa < sb - EPS then return pa, sa end
    if sb < sa - EPS then return pb, sb end
    if rand() * (pa.weight + pb.weight) < pa.weight then return pa, sa end
    return pb, sb
end

-- Move `d` of the first `n` candidates, drawn uniformly without replacement, to the front (a partial
-- Fisher-Yates shuffle); returns d.
function M.sample(cands, n, d, rand)
    for i = 1, d do
        local j = i + floor(rand() * (n - i + 1))
        if j > n then j = n end -- rand() is below 1; guard the float edge anyway
        cands[i], cands[j] = cands[j], cands[i]
    end
    return d
end

-- Copy into `out` the peers not yet tried by this request for which ok(p) holds; returns how many.
function M.candidates(peers, tried, ok, out)
    local n = 0
    for i = 1, #peers do
        local p = peers[i]
        if not tried[p.name] and ok(p) then
            n = n + 1
            out[n] = p
        end
    end
    return n
end

-- The peer for the next attempt of a request, or nil when there is none to try. First among the untried
-- usable peers; when none is usable, among the untried ones `fallback(p)` accepts (fail open: a guess
-- beats an error for every client; the balancer's fallback is "not out by its own evidence", i.e. held
-- down by the sidecar alone, whose view may be late), unless `fallback` is nil.
function M.choose(mode, peers, tried, usable, load, rand, scratch, fallback)
    local n = M.candidates(peers, tried, usable, scratch)
    if n == 0 and fallback then n = M.candidates(peers, tried, fallback, scratch) end
    if n == 0 then return nil end
    if mode == "p2c" then return M.p2c(scratch, n, load, rand) end
    if n > M.SAMPLE_ABOVE then n = M.sample(scratch, n, M.SAMPLE, rand) end
    return M.least(scratch, n, load, rand)
end

return M
