-- fdngx.ledger: in-flight counters that cannot drift (no ngx here: any object with the ngx.shared.DICT
-- methods get/set/incr/delete/get_keys will do, so luajit tests drive it with a fake dict).
--
-- What must hold: `i:<peer>` in the shared dict is the number of requests this nginx has open on the
-- peer, over all workers, including workers of an older configuration still draining after a reload.
-- The balancer increments it when it picks a peer and decrements it when that attempt ends (retry or log
-- phase). A worker that dies mid-request (crash, SIGKILL, OOM) never decrements, and a plain counter
-- would then stay high forever, starving that peer.
--
-- So each worker also keeps its own share in `o:<wid>:<peer>` (incremented and decremented with the
-- total, in the same non-yielding Lua step), and a lease `alive:<wid>` it renews every second with a
-- 5 s expiry. wid = "<pid>.<start ms>" is unique even when the kernel reuses a pid. Every REAP_EVERY
-- seconds one worker (a shared-dict lock) looks for shares whose worker has no lease AND whose pid no
-- longer exists (kill(pid, 0) == ESRCH), or is a younger process's (M.REUSED_AFTER): a worker draining
-- after a reload cannot renew its lease (its timers stop) but is still alive, so it is left alone and its
-- requests still decrement when they end.
-- A dead worker's shares are subtracted from the totals and deleted: exact, since nobody else writes
-- them. A share that reaches 0 is deleted by its owner, so the keys stay few; a removed peer's total goes
-- once it is back at 0 (fdngx.pool.sweep), and nothing here brings a total that is gone back (as -1).
-- Reads clamp at 0, so a transient race can never make a peer look better than idle.

local M = {}

-- Add 1 to counter `key`, creating it at 0 without evicting anything. True, or nil (no room).
local function bump(dict, key)
    if dict:incr(key, 1) then return true end
    local ok, err = dict:safe_add(key, 0)
    if not ok and err ~= "exists" then return nil end
    return dict:incr(key, 1) ~= nil
end

M.LEASE = 5 -- seconds a worker's lease lasts without renewal
M.RENEW_EVERY = 1
M.REAP_EVERY = 2

local Ledger = {}
Ledger.__index = Ledger

-- wid: this worker's id; dict: the pool's shared dict.
function M.new(dict, wid)
    return setmetatable({ dict = dict, wid = wid, prefix = "o:" .. wid .. ":" }, Ledger)
end

function M.worker_id(pid, now)
    return string.format("%d.%d", pid, math.floor(now * 1000))
end

-- Count one request open on `name`. Returns true, or nil when the dict has no room for a counter: the request
-- then goes uncounted, and the caller must not release it. Nothing is evicted to make room (a plain incr with
-- an init value would evict the least recently used keys: the shares of the longest requests still open,
-- whose totals would then never come down).
function Ledger:acquire(name)
    local dict, share = self.dict, self.prefix .. name
    if not bump(dict, share) then return nil end
    if not bump(dict, "i:" .. name) then
        local mine = dict:incr(share, -1)
        if mine and mine <= 0 then dict:delete(share) end
        return nil
    end
    return true
end

-- End a request acquire() counted.
function Ledger:release(name)
    local dict = self.dict
    local key = self.prefix .. name
    local mine = dict:incr(key, -1)
    -- A missing share means it was reaped (this worker was taken for dead): the total no longer holds it.
    if mine ~= nil then
        dict:incr("i:" .. name, -1)
        if mine <= 0 then dict:delete(key) end
    end
end

function Ledger:inflight(name)
    local n = self.dict:get("i:" .. name)
    if not n or n < 0 then return 0 end
    return n
end

-- Renew this worker's lease; false when a full dict refused it (the reaper then asks the pid, which lives).
function Ledger:renew()
    return (self.dict:safe_set("alive:" .. self.wid, true, M.LEASE))
end

-- When the process whose /proc/<pid>/stat reads `stat` started, in seconds since the epoch (`btime`: the
-- boot time from /proc/stat; `hz`: clock ticks per second), or nil when the text is not such a line. The
-- command name (field 2) may hold spaces and parentheses: the fields are counted after its last ")".
function M.started_at(stat, btime, hz)
    local rest = type(stat) == "string" and stat:match("^%d+ %(.*%) (.*)$")
    if not rest or not btime or not hz or hz <= 0 then return nil end
    local i = 2 -- the state is field 3
    for field in rest:gmatch("%S+") do
        i = i + 1
        if i == 22 then return btime + (tonumber(field) or 0) / hz end
    end
    return nil
end

-- A pid that lives may be another process's now: a dead worker's pid reused within the few seconds before
-- its shares were reaped would pin them for as long as that process lives. One that started more than this
-- long after the worker it stands for came up is not that worker (the slack covers the boot time's whole
-- seconds and a clock stepped since).
M.REUSED_AFTER = 60

-- Subtract the shares of dead workers from the totals; pid_alive(pid, since) -> bool, `since` the worker's
-- start in seconds since the epoch (its id's ms); keys: the dict's keys (dict:get_keys(0) when nil).
-- Returns how many requests were taken back and from how many worker ids.
function M.reap(dict, pid_alive, keys)
    local taken, dead = 0, {}
    keys = keys or dict:get_keys(0)
    for _, key in ipairs(keys) do
        local wid, pid, ms, name = key:match("^o:(([0-9]+)%.([0-9]+)):(.+)$")
        if wid then
            local gone = dead[wid]
            if gone == nil then
                gone = dict:get("alive:" .. wid) == nil and not pid_alive(tonumber(pid), tonumber(ms) / 1000)
                dead[wid] = gone
            end
            if gone then
                local v = dict:get(key)
                dict:delete(key)
                if v and v ~= 0 then
                    dict:incr("i:" .. name, -v)
                    taken = taken + v
                end
            end
        end
    end
    local workers = 0
    for _, gone in pairs(dead) do
        if gone then workers = workers + 1 end
    end
    return taken, workers
end

return M
