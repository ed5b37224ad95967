-- fdngx.balancer.init (init_by_lua, in the master at start and at every reload) with a stand-in for ngx.
-- At a reload the old workers still take pushes: init's read of the dict, its verdict and its install of the
-- peers file must not straddle a push (an outside review, 2026-12-06, on the real nginx: 3 of 15 pushes sent
-- around a HUP were answered "ok" and then replaced by the older peers file).
local pool_mod = require("fdngx.pool")
local peers = require("fdngx.peers")
local fakedict = require("fakedict")

local NOW = 1733212345.678
local MS = math.floor(NOW * 1000)

local function write(path, text)
    local fh = assert(io.open(path, "wb"))
    fh:write(text)
    fh:close()
end

local function snap_text(gen, port)
    return string.format("generation %d\npeer a 127.0.0.1 %d 20 0 64 0\n", gen, port)
end

-- init() with the dict `dict` and a peers file of generation `gen` (or text `gen`); returns the log lines, or
-- raises init's error.
local function init(dict, gen)
    local logs = {}
    local was = _G.ngx
    _G.ngx = {
        WARN = "warn", ERR = "err", INFO = "info", NOTICE = "notice",
        shared = { fdngx_fastdeploy = dict },
        update_time = function() end,
        now = function() return NOW end,
        log = function(level, ...) logs[#logs + 1] = level .. " " .. table.concat({ ... }) end,
    }
    package.preload["ngx.balancer"] = function() return {} end
    for _, m in ipairs({ "fdngx.balancer", "fdngx.admin" }) do package.loaded[m] = nil end
    local token, file = os.tmpname(), os.tmpname()
    write(token, string.rep("t", 32) .. "\n")
    write(file, type(gen) == "string" and gen or snap_text(gen, 2))
    local ok, err = pcall(function()
        require("fdngx.balancer").init({ pool = "fastdeploy", dict = "fdngx_fastdeploy", token_file = token,
                                         peers_file = file, mode = "least" })
    end)
    os.remove(token); os.remove(file)
    _G.ngx = was
    if not ok then error(err, 0) end
    return logs
end

local function pushed(dict, gen)
    local text = snap_text(gen, 1)
    assert(pool_mod.install({ name = "fastdeploy", dict = dict }, text, assert(peers.parse(text)), NOW))
end

return {
    ["init installs a newer peers file, under the admin lock, and gives the lock back"] = function(t)
        local dict = fakedict.new()
        pushed(dict, MS - 2000)
        init(dict, MS - 1000)
        t.eq(dict:get("gen"), MS - 1000)
        t.ok(pool_mod.text(dict):find("127.0.0.1 2 ", 1, true), "the file's snapshot in force")
        t.eq(dict:get("adm:lock"), nil, "the lock is given back")
    end,

    ["init keeps a newer push"] = function(t)
        local dict = fakedict.new()
        pushed(dict, MS - 1000)
        init(dict, MS - 2000)
        t.eq(dict:get("gen"), MS - 1000)
    end,

    ["init leaves the dict to a push that holds the admin lock (a reload while old workers take pushes)"] = function(t)
        local dict = fakedict.new()
        pushed(dict, MS - 2000)
        dict:add("adm:lock", true, 5) -- an old worker is installing a push
        local logs = init(dict, MS - 1000)
        t.eq(dict:get("gen"), MS - 2000, "the file did not replace the dict under the push")
        t.ok(pool_mod.text(dict):find("127.0.0.1 1 ", 1, true))
        t.eq(dict:get("adm:lock"), true, "the push's lock is not init's to delete")
        t.ok(table.concat(logs, "\n"):find("a push is being applied", 1, true), table.concat(logs, "\n"))
    end,

    ["a first start installs the file"] = function(t)
        local dict = fakedict.new()
        init(dict, MS)
        t.eq(dict:get("gen"), MS)
        t.eq(dict:get("ver"), 1)
    end,

    ["a peers file for another upstream stops nginx's start, naming both"] = function(t)
        local dict = fakedict.new()
        local ok, err = pcall(init, dict, string.format("generation %d\nupstream modelB\nempty\n", MS))
        t.ok(not ok)
        t.ok(err:find(" is for upstream modelB, this config's is fastdeploy", 1, true), err)
        t.eq(dict:get("gen"), nil)
        init(dict, string.format("generation %d\nupstream fastdeploy\npeer a 127.0.0.1 2 20 0 64 0\n", MS))
        t.eq(dict:get("gen"), MS)
    end,

    ["a peers file's down flags are as old as its generation: last week's hold nothing, a fresh one's do"] =
    function(t)
        local dict = fakedict.new()
        local old = MS - 7 * 86400 * 1000
        init(dict, string.format("generation %d\npeer a 127.0.0.1 2 20 1 64 0\n", old))
        t.eq(dict:get("snap_at"), old / 1000)
        t.eq(dict:get("put_at"), NOW, "installed now: no push is missed yet")
        local pool = { name = "fastdeploy", dict = dict }
        pool_mod.sync(pool, NOW)
        t.eq(pool_mod.silent(pool, NOW), true)
        dict = fakedict.new()
        init(dict, string.format("generation %d\npeer a 127.0.0.1 2 20 1 64 0\n", MS - 1000))
        pool = { name = "fastdeploy", dict = dict }
        pool_mod.sync(pool, NOW)
        t.eq(pool_mod.silent(pool, NOW), false)
        t.eq(pool_mod.silent(pool, NOW + 9), true, "its writer's view, 10 s after it was written")
    end,
}
