-- A stand-in for ngx.shared.DICT that runs out of room the way nginx's does (lua-nginx-module 0.10.23,
-- src/ngx_http_lua_shdict.c, ngx_http_lua_ffi_shdict_store): a store over an existing key whose value size
-- changes FREES the old value first, then allocates; when that fails, a plain set/add/incr evicts up to 30
-- least recently used items (forcible) and tries again, a safe_set/safe_add fails at once ("no memory");
-- the old value is gone either way. Budget in bytes; an item costs #key + #value (numbers: 8) + 64.
-- (Reviewer's reconstruction, 2026-12-06; the costs are a model, not nginx's slab sizes.)
local base = require("fakedict")
local M = setmetatable({}, { __index = base })
M.__index = M

local function cost(k, v) return #k + (type(v) == "string" and #v or 8) + 64 end

function M.new(budget)
    local d = base.new()
    d.budget, d.used, d.lru, d.evicted = budget, 0, {}, {}
    return setmetatable(d, M)
end

function M:_touch(key)
    for i, k in ipairs(self.lru) do if k == key then table.remove(self.lru, i) break end end
    table.insert(self.lru, key) -- tail = most recent
end

function M:_drop(key)
    local v = self.data[key]
    if v ~= nil then self.used = self.used - cost(key, v) end
    for i, k in ipairs(self.lru) do if k == key then table.remove(self.lru, i) break end end
    self.data[key], self.exp[key] = nil, nil
end

function M:get(key)
    local v = base.get(self, key)
    if v ~= nil then self:_touch(key) end
    return v
end

function M:_store(key, value, exptime, safe)
    local old = self.data[key]
    if old ~= nil and cost(key, old) == cost(key, value) then
        self.data[key] = value
        self.exp[key] = (exptime and exptime > 0) and (self.clock + exptime) or nil
        self:_touch(key)
        return true
    end
    self:_drop(key) -- nginx removes the old entry before allocating the new one
    local forcible = false
    for _ = 1, 31 do
        if self.used + cost(key, value) <= self.budget then
            base.set(self, key, value, exptime)
            self.used = self.used + cost(key, value)
            self:_touch(key)
            return true, nil, forcible
        end
        local victim = self.lru[1]
        if safe or not victim then break end
        self.evicted[#self.evicted + 1] = victim
        self:_drop(victim)
        forcible = true
    end
    return false, "no memory", forcible
end

function M:set(key, value, exptime) return self:_store(key, value, exptime, false) end
function M:safe_set(key, value, exptime) return self:_store(key, value, exptime, true) end

function M:add(key, value, exptime)
    if self:_live(key) ~= nil then return false, "exists" end
    return self:_store(key, value, exptime, false)
end

function M:safe_add(key, value, exptime)
    if self:_live(key) ~= nil then return false, "exists" end
    return self:_store(key, value, exptime, true)
end

function M:incr(key, delta, init)
    local v = self:_live(key)
    if v == nil then
        if init == nil then return nil, "not found" end
        local ok, err, forcible = self:_store(key, init + delta, nil, false)
        if not ok then return nil, err end
        return init + delta, nil, forcible
    end
    self.data[key] = v + delta
    self:_touch(key)
    return v + delta
end

function M:delete(key) self:_drop(key) end

function M:free_space() return self.budget - self.used end

return M
