-- fdngx.admin: the answers of the admin location to a push, driven through handle() with a stand-in for ngx
-- (request body, clock, log) and a fake shared dict.
local pool_mod = require("fdngx.pool")
local store = require("fdngx.store")
local fakedict = require("fakedict")

local TOKEN = "0123456789abcdef-token"
local NOW = 1733212345.678 -- seconds; generations are milliseconds
local MS = math.floor(NOW * 1000)

-- A fresh fake ngx for one request: POST `body` at `now`; returns it and what the handler answered.
local function fake_ngx(body, now)
    local said = { logs = {} }
    local ngx = {
        WARN = "warn", INFO = "info", ERR = "err",
        var = { http_x_fdngx_token = TOKEN },
        header = {},
        req = {
            read_body = function() end,
            get_body_data = function() return body end,
            get_body_file = function() return nil end,
            get_method = function() return "POST" end,
        },
        update_time = function() end,
        now = function() return now end,
        sleep = function() error("the admin lock is never held in these tests") end,
        say = function(text) said.text = text end,
        exit = function(status) said.exit = status end,
        log = function(level, ...) said.logs[#said.logs + 1] = level .. " " .. table.concat({ ... }) end,
    }
    return ngx, said
end

local function new_pool()
    return { name = "fastdeploy", dict = fakedict.new(), token = TOKEN, mode = "least" }
end

local function body(gen, weight, upstream)
    return string.format("generation %d\n%speer a 127.0.0.1 1 %d 0 64 0\npeer b 127.0.0.1 2 20 0 64 0\n", gen,
                         upstream and "upstream " .. upstream .. "\n" or "", weight or 20)
end

-- POST `text` to `pool` at `now` (default NOW): status, answer text, log lines.
local function post(pool, text, now)
    local ngx, said = fake_ngx(text, now or NOW)
    local was = _G.ngx
    _G.ngx = ngx
    package.loaded["fdngx.admin"] = nil -- admin caches nothing of ngx, but load it under this one
    local ok, err = pcall(function() require("fdngx.admin").handle(pool) end)
    _G.ngx = was
    assert(ok, err)
    return ngx.status, said.text, said.logs
end

-- A pool wedged before this rule: a far-future generation installed with nothing to refuse it.
local function wedged(gen)
    local pool = new_pool()
    local text = body(gen, 1)
    assert(pool_mod.install(pool, text, assert(require("fdngx.peers").parse(text)), NOW))
    return pool
end

return {
    ["admin: a generation far ahead of the clock is refused (400), nothing applied; an honest one still is"] =
    function(t)
        local pool = new_pool()
        local status, text = post(pool, body(MS))
        t.eq(status, 200); t.ok(text:find("^ok generation=" .. MS), text)
        status, text = post(pool, body(2 ^ 53 - 1, 1))
        t.eq(status, 400)
        t.ok(text:find("generation 9007199254740991 is %d+ s ahead of this frontend's clock %(at most 300 s%)"), text)
        t.ok(text:find("nothing applied", 1, true) and not text:find("\n"), text)
        t.eq(pool.dict:get("gen"), MS, "nothing applied")
        -- just past the window: refused too; at its edge (a clock five minutes ahead): taken
        status = post(pool, body(MS + pool_mod.FUTURE_MS + 1000))
        t.eq(status, 400)
        status, text = post(pool, body(MS + pool_mod.FUTURE_MS - 1000, 7))
        t.eq(status, 200, text)
        t.eq(pool.dict:get("gen"), MS + pool_mod.FUTURE_MS - 1000)
        -- and the usual answers around it stay
        status, text = post(pool, body(MS + 1))
        t.eq(status, 409); t.eq(text, string.format("stale generation=%d current=%d (nothing applied)", MS + 1,
                                                    MS + pool_mod.FUTURE_MS - 1000))
        status, text = post(pool, body(MS + pool_mod.FUTURE_MS - 1000, 7))
        t.eq(status, 200); t.ok(text:find("^unchanged generation="), text)
    end,

    ["admin: a pool wedged by a far-future generation takes the next honest push, with a WARN"] = function(t)
        local pool = wedged(2 ^ 53 - 1)
        local status, text, logs = post(pool, body(MS, 9))
        t.eq(status, 200, text); t.ok(text:find("^ok generation=" .. MS), text)
        t.eq(pool.dict:get("gen"), MS)
        local warn = table.concat(logs, "\n")
        t.ok(warn:find("warn fdngx: pool fastdeploy: generation 9007199254740991 in force was %d+ s ahead of this "
                       .. "clock; replaced by " .. MS), warn)
        -- from then on the usual rule: older is stale, newer wins
        status = post(pool, body(MS - 1))
        t.eq(status, 409)
        status = post(pool, body(MS + 1))
        t.eq(status, 200)
        -- a generation in force that is ahead, but within the window, is a newer snapshot, not a wedge
        pool = wedged(MS + 60000)
        status, text = post(pool, body(MS))
        t.eq(status, 409, text)
    end,

    ["admin: a snapshot for another upstream is refused (409), naming both; one for this pool, or none, is taken"] =
    function(t)
        -- An outside review: a frontend of modelB took the push of upstream fleet (a push file listing it by
        -- mistake) and sent modelB's traffic to fleet's replicas, with nothing said anywhere.
        local pool = new_pool()
        local status, text = post(pool, body(MS, 20, "fleet"))
        t.eq(status, 409)
        t.eq(text, "snapshot for upstream fleet; this frontend's pool is fastdeploy (nothing applied): does the push "
                   .. "file of upstream fleet list a frontend of fastdeploy, or was this frontend rendered from an "
                   .. "inventory with another upstream name?")
        t.eq(pool.dict:get("gen"), nil, "nothing applied")
        status, text = post(pool, body(MS, 20, "fastdeploy"))
        t.eq(status, 200, text); t.ok(text:find("^ok generation=" .. MS), text)
        -- an older fdngx's push names none: taken unchecked (upgrade the frontends first: docs/controller.md)
        status, text = post(pool, body(MS + 1, 20))
        t.eq(status, 200, text)
        -- refused before the generation is even looked at: never "stale" for another upstream's
        status = post(pool, body(MS - 5, 20, "fleet"))
        t.eq(status, 409)
        t.eq(pool.dict:get("gen"), MS + 1)
    end,

    ["admin: other bytes under the generation in force: every frontend keeps the same ones, whatever the order"] =
    function(t)
        -- An outside review: a different body under the generation in force was answered "unchanged" and not
        -- applied, so two pushers in one millisecond left frontends with different snapshots of one generation.
        local a, b = body(MS, 5), body(MS, 7)
        local first, second = new_pool(), new_pool()
        t.eq(post(first, a), 200); t.eq(post(second, b), 200)
        local s1, t1 = post(first, b)
        local s2, t2 = post(second, a)
        local keep = b > a and b or a
        t.eq(pool_mod.text(first.dict), keep); t.eq(pool_mod.text(second.dict), keep)
        -- the bytes that sort last went in where they came second, and the others were refused as stale
        t.eq(b > a and s1 or s2, 200); t.ok((b > a and t1 or t2):find("^ok generation=" .. MS), t1 .. t2)
        t.eq(b > a and s2 or s1, 409)
        t.eq(b > a and t2 or t1, string.format("stale generation=%d current=%d (nothing applied)", MS, MS))
        -- the same bytes again: a retry
        local status, text = post(first, keep)
        t.eq(status, 200); t.eq(text, string.format("unchanged generation=%d peers=2", MS))
    end,

    ["admin: an older generation takes over once the one in force was not pushed again for 10 s, with a WARN"] =
    function(t)
        local pool = new_pool()
        local ahead = MS + 60000 -- a controller whose clock is a minute ahead pushed last, then died
        t.eq(post(pool, body(ahead, 5), NOW), 200)
        local status, text = post(pool, body(MS + 5000, 9), NOW + 5)
        t.eq(status, 409, "its pusher was heard 5 s ago: the newest wins"); t.ok(text:find("^stale"), text)
        local logs
        status, text, logs = post(pool, body(MS + 10000, 9), NOW + 10)
        t.eq(status, 200, text); t.ok(text:find("^ok generation=" .. (MS + 10000)), text)
        t.eq(pool.dict:get("gen"), MS + 10000)
        local said = table.concat(logs, "\n")
        t.ok(said:find("warn fdngx: pool fastdeploy: generation " .. ahead .. " in force was not pushed again for "
                       .. "10 s (its pusher went silent): replaced by the older generation " .. (MS + 10000)
                       .. ", 50.0 s older, of another pusher", 1, true), said)
        -- from then on its own pushes are newer; the dead one's back: its generation is newer again, and wins
        t.eq(post(pool, body(MS + 12000, 9), NOW + 12), 200)
        t.eq(post(pool, body(ahead + 12000, 5), NOW + 12.5), 200)
        t.eq(post(pool, body(MS + 14000, 9), NOW + 14), 409, "two live pushers: the newest wins, as before")
    end,

    ["admin: a push after a silence says that the down flags hold again"] = function(t)
        local pool = new_pool()
        t.eq(post(pool, body(MS, 5), NOW), 200)
        t.near(store.went_quiet(pool.dict, NOW + 12), 12, 1e-6)
        local status, _, logs = post(pool, body(MS + 20000, 5), NOW + 20)
        t.eq(status, 200)
        local said = table.concat(logs, "\n")
        t.ok(said:find("warn fdngx: pool fastdeploy: a push again, after 20 s without one: its down flags hold "
                       .. "replicas out again", 1, true), said)
        local _, _, quiet = post(pool, body(MS + 22000, 5), NOW + 22)
        t.ok(not table.concat(quiet, "\n"):find("a push again", 1, true), "said once")
    end,

    ["admin: a pusher slower than SILENT_AFTER is not taken as gone between its pushes"] = function(t)
        -- An outside review: at --interval 15 (or a cron `render --scrape` every minute) the down flags lapsed,
        -- and the frontend said so twice, between every two pushes of a pusher that was alive all along.
        local pool = new_pool()
        t.eq(post(pool, body(MS, 5), NOW), 200)
        t.eq(store.hold(pool.dict), store.SILENT_AFTER, "one push: no pace known yet")
        t.eq(post(pool, body(MS + 15000, 5), NOW + 15), 200)
        t.eq(store.hold(pool.dict), 45, "three of its intervals")
        pool_mod.sync(pool, NOW + 29)
        t.ok(not pool_mod.silent(pool, NOW + 29), "14 s after its last push: not silent")
        t.eq(store.went_quiet(pool.dict, NOW + 29), nil, "and nothing said")
        t.ok(pool_mod.silent(pool, NOW + 15 + 45), "three intervals without one: gone")
        t.eq(post(pool, body(MS + 3600000, 5), NOW + 3600), 200)
        t.eq(store.hold(pool.dict), store.MAX_HOLD, "at most MAX_HOLD")
        local at, holds = 3600, {}
        for i = 1, 6 do
            at = at + 2
            t.eq(post(pool, body(MS + at * 1000, 5), NOW + at), 200)
            holds[i] = store.hold(pool.dict)
        end
        t.eq(table.concat(holds, " "), "150 75 37.5 18.75 10 10", "back to its pace of 2 s, by halves")
        -- two live pushers taking turns, 0.5 s apart once a minute (two cron hosts): never taken as gone
        local two, t0 = new_pool(), NOW + 7200
        for k = 0, 5 do
            for _, dt in ipairs({ 0, 0.5 }) do
                local at2 = t0 + 60 * k + dt
                t.eq(post(two, body(math.floor(at2 * 1000), 5), at2), 200)
            end
            if k >= 1 then
                pool_mod.sync(two, t0 + 60 * k + 59)
                t.ok(not pool_mod.silent(two, t0 + 60 * k + 59), "just before the next pair, minute " .. k)
            end
        end
        -- a standby's older generation takes over after the hold, not after SILENT_AFTER
        t.eq(store.verdict(MS + 60000, MS, NOW, 20, nil, 45), "stale")
        t.eq(store.verdict(MS + 60000, MS, NOW, 45, nil, 45), "taken")
    end,
}
