-- fdngx balancer for the OpenResty flavor (inlined into init_by_lua_block by the templates).
--
-- Per request, pick the peer with the least estimated load per unit of weight, like nginx's least_conn
-- (ties go to a weighted random pick, as nginx's weighted round robin would spread them):
--     (requests this nginx has in flight there + load from elsewhere) / weight
-- "In flight" is live (shared by all workers through lua_shared_dict); "load from elsewhere" is what the
-- sidecar scraped (running + queued) minus what this nginx had in flight at that moment, fading to 0 as
-- the scrape ages. The sidecar pushes weights/down/load to the admin location: no reload, ever.
-- Optional power-of-two-choices ("p2c") spreads picks when several frontends act on one snapshot.
local balancer = require("ngx.balancer")

fdngx = { pools = {} }

local STALE_AFTER = 10.0   -- seconds: scraped external load fades to nothing by then

function fdngx.add_pool(name, dict_name, token_file, peers, mode)
    local dict = ngx.shared[dict_name]
    if not dict then
        error("fdngx: lua_shared_dict " .. dict_name .. " is missing")
    end
    -- The token stays out of the (world-readable) config: read it from its 0600 file at load time.
    local fh, err = io.open(token_file, "r")
    if not fh then
        error("fdngx: cannot read admin token file " .. token_file .. ": " .. tostring(err))
    end
    local token = fh:read("*l")
    fh:close()
    if not token or #token < 16 then
        error("fdngx: admin token in " .. token_file .. " is shorter than 16 characters")
    end
    fdngx.pools[name] = { dict = dict, token = token, peers = peers, mode = mode or "least" }
end

local function weight_of(dict, p)
    local weight = dict:get("w:" .. p.name) or p.weight
    if weight <= 0 then weight = 1 end
    return weight
end

local function score(dict, p, now)
    local weight = weight_of(dict, p)
    local inflight = dict:get("i:" .. p.name) or 0
    if inflight < 0 then inflight = 0 end
    local ext = dict:get("x:" .. p.name) or 0
    local at = dict:get("t:" .. p.name) or 0
    local age = now - at
    if age >= STALE_AFTER then
        ext = 0
    elseif age > 0 then
        ext = ext * (1 - age / STALE_AFTER)
    end
    return (inflight + ext) / weight
end

local function is_down(dict, p)
    local d = dict:get("d:" .. p.name)
    if d == nil then return p.down end
    return d == 1
end

local function pick(pool, tried, now, ignore_down)
    local dict, peers = pool.dict, pool.peers
    local candidates = {}
    for i = 1, #peers do
        local p = peers[i]
        if not tried[i] and (ignore_down or not is_down(dict, p)) then
            candidates[#candidates + 1] = i
        end
    end
    local n = #candidates
    if n == 0 then return nil end
    if pool.mode == "p2c" and n > 2 then
        local a = candidates[math.random(n)]
        local b = candidates[math.random(n - 1)]
        if b == a then b = candidates[n] end
        local sa, sb = score(dict, peers[a], now), score(dict, peers[b], now)
        if sa <= sb then return a end
        return b
    end
    local best, best_score, tie_weight = nil, nil, 0
    for k = 1, n do
        local i = candidates[k]
        local s = score(dict, peers[i], now)
        local w = weight_of(dict, peers[i])
        if best == nil or s < best_score - 1e-9 then
            best, best_score, tie_weight = i, s, w
        elseif s <= best_score + 1e-9 then
            -- weighted reservoir pick among equals: each wins with probability weight / total weight
            tie_weight = tie_weight + w
            if math.random() * tie_weight < w then best = i end
        end
    end
    return best
end

function fdngx.balance(name)
    local pool = fdngx.pools[name]
    local ctx = ngx.ctx
    local tried = ctx.fdngx_tried
    if tried then
        -- nginx is retrying (connection error, 429/503): the previous peer no longer holds this request.
        pool.dict:incr("i:" .. ctx.fdngx_peer, -1, 0)
        ctx.fdngx_peer = nil
    else
        tried = {}
        ctx.fdngx_tried = tried
        local more = #pool.peers - 1
        if more > 2 then more = 2 end
        if more > 0 then balancer.set_more_tries(more) end
    end
    local now = ngx.now()
    -- If every peer is held out, fail open rather than answer 502 to everyone.
    local i = pick(pool, tried, now, false) or pick(pool, tried, now, true)
    if not i then
        return ngx.exit(502)
    end
    local p = pool.peers[i]
    tried[i] = true
    ctx.fdngx_peer = p.name
    ctx.fdngx_pool = name
    pool.dict:incr("i:" .. p.name, 1, 0)
    local ok, err = balancer.set_current_peer(p.host, p.port)
    if not ok then
        ngx.log(ngx.ERR, "fdngx: set_current_peer ", p.host, ":", p.port, " failed: ", err)
        return ngx.exit(500)
    end
end

-- log phase: the request is over, release its slot.
function fdngx.done()
    local ctx = ngx.ctx
    local name = ctx.fdngx_peer
    if name then
        fdngx.pools[ctx.fdngx_pool].dict:incr("i:" .. name, -1, 0)
        ctx.fdngx_peer = nil
    end
end

-- Admin: POST lines "name weight down load" (down: 0/1, load: running + queued scraped just now);
-- GET lists "name weight down inflight external". Loopback-only and token-checked by the config.
function fdngx.admin(name)
    local pool = fdngx.pools[name]
    if ngx.var.http_x_fdngx_token ~= pool.token then
        ngx.status = 403
        ngx.say("bad or missing X-Fdngx-Token")
        return ngx.exit(403)
    end
    local dict = pool.dict
    local known = {}
    for i = 1, #pool.peers do known[pool.peers[i].name] = true end
    if ngx.req.get_method() == "POST" then
        ngx.req.read_body()
        local body = ngx.req.get_body_data() or ""
        local now = ngx.now()
        local updated, unknown = 0, 0
        for line in body:gmatch("[^\n]+") do
            local peer, w, d, load = line:match("^(%S+)%s+(%d+)%s+([01])%s+([%d.]+)%s*$")
            if peer and known[peer] then
                local inflight = dict:get("i:" .. peer) or 0
                if inflight < 0 then inflight = 0 end
                local ext = tonumber(load) - inflight
                if ext < 0 then ext = 0 end
                dict:set("w:" .. peer, tonumber(w))
                dict:set("d:" .. peer, tonumber(d))
                dict:set("x:" .. peer, ext)
                dict:set("t:" .. peer, now)
                updated = updated + 1
            else
                unknown = unknown + 1
            end
        end
        ngx.say("updated ", updated, " ignored ", unknown)
        return
    end
    local now = ngx.now()
    for i = 1, #pool.peers do
        local p = pool.peers[i]
        local d = is_down(dict, p) and 1 or 0
        ngx.say(p.name, " ", dict:get("w:" .. p.name) or p.weight, " ", d, " ",
                dict:get("i:" .. p.name) or 0, " ", string.format("%.3f", score(dict, p, now)))
    end
end
