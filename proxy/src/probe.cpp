// POST /probe on the admin endpoint: an instance tries its own next hop for one rule, from
// its own source address and with the rule's TLS name and CA, exactly as a request would,
// and says what happened. `dmzproxy diagnose` asks each tier in turn, so a real deployment
// (not only a lab on one machine) learns which hop the network breaks.
//
// Only a configured next hop can be probed (the caller names a rule, never an address), at
// most `burst` probes in a row, one more per second: the endpoint is not a port scanner.
#include <nlohmann/json.hpp>

#include "admin.hpp"
#include "net/upstream.hpp"

namespace dmz::proxy {

namespace {

using namespace net;

std::string percent_decoded(std::string_view s) {
    std::string out;
    for (std::size_t i = 0; i < s.size(); ++i) {
        auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; };
        if (s[i] == '%' && i + 2 < s.size() && hex(s[i + 1]) >= 0 && hex(s[i + 2]) >= 0) {
            out += static_cast<char>(hex(s[i + 1]) * 16 + hex(s[i + 2]));
            i += 2;
        } else {
            out += s[i] == '+' ? ' ' : s[i];
        }
    }
    return out;
}

/// The value of `key` in a query string ("" when absent).
std::string query_value(std::string_view query, std::string_view key) {
    while (!query.empty()) {
        auto amp = query.find('&');
        auto pair = query.substr(0, amp);
        auto eq = pair.find('=');
        if (pair.substr(0, eq) == key) return eq == std::string_view::npos ? std::string() : percent_decoded(pair.substr(eq + 1));
        if (amp == std::string_view::npos) break;
        query.remove_prefix(amp + 1);
    }
    return {};
}

/// The TCP part of a connect failure in the words diagnose uses for every hop.
std::string tcp_words(const std::string& detail) {
    if (detail.find("(10061)") != std::string::npos) return "connection refused (10061)";
    if (detail.find("(10060)") != std::string::npos) return "connection timed out (10060)";
    if (detail.find("(10065)") != std::string::npos) return "no route (10065)";
    return detail;
}

probe_answer answered(int status, const nlohmann::json& j, std::string extra = {}) {
    return probe_answer{status, j.dump(2) + "\n", std::move(extra)};
}

}  // namespace

bool probe_budget::take(std::chrono::steady_clock::time_point now, std::chrono::seconds& retry_after) {
    if (last_ != std::chrono::steady_clock::time_point{}) {
        auto refill = std::chrono::duration<double>(now - last_).count() * per_second;
        tokens_ = std::min<double>(burst, tokens_ + refill);
    }
    last_ = now;
    if (in_flight >= max_in_flight || tokens_ < 1) {
        retry_after = std::chrono::seconds(tokens_ < 1 ? static_cast<long>((1 - tokens_) / per_second) + 1 : 1);
        return false;
    }
    tokens_ -= 1;
    return true;
}

task<probe_answer> run_probe(worker& w, const admin_view& v, std::string_view query) {
    auto rt = *v.current;  // this snapshot, even if a reload replaces it meanwhile
    auto name = query_value(query, "rule");
    if (name.empty()) co_return answered(400, nlohmann::json{{"error", "name the rule whose next hop to probe: POST /probe?rule=NAME"}});
    const rules::rule* rule = nullptr;
    for (auto& r : rt->config().rules)
        if (r.name == name) rule = &r;
    if (!rule) {
        nlohmann::json names = nlohmann::json::array();
        for (auto& r : rt->config().rules) names.push_back(r.name);
        co_return answered(404, nlohmann::json{{"error", "no rule '" + name + "' in config version " + std::to_string(*v.version)}, {"rules", names}});
    }
    if (!rule->to || !rule->to->address)
        co_return answered(422, nlohmann::json{{"error", "rule '" + name + "' has no next hop (a " + rules::to_string(rule->act) + " rule)"}});
    std::chrono::seconds retry{};
    if (!v.probes->take(std::chrono::steady_clock::now(), retry))
        co_return answered(429, nlohmann::json{{"error", "too many probes: at most " + std::to_string(v.probes->burst) + " in a row, one more per second"}},
                           "Retry-After: " + std::to_string(retry.count()) + "\r\n");
    ++v.probes->in_flight;
    const auto& to = *rule->to;
    nlohmann::json j = {{"instance", rt->name}, {"config_version", *v.version}, {"rule", rule->name},
                        {"target", to.describe()}, {"address", to.address->to_string()}, {"port", to.port}, {"tls", to.tls},
                        {"source", to.source ? nlohmann::json(to.source->to_string()) : nlohmann::json(nullptr)}};
    auto started = std::chrono::steady_clock::now();
    rules::fault f;
    std::vector<std::string> presented;
    auto conn = co_await connect_upstream(w.io, w.upstream_tls, to, "probe", f, nullptr, &presented);
    --v.probes->in_flight;
    j["ms"] = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
    if (conn) {
        error_code ec;
        auto local = conn->stream.socket().local_endpoint(ec);
        if (!ec) j["source"] = local.address().to_string();
        j["result"] = "ok";
        j["tcp"] = "ok";
        j["tls"] = to.tls ? nlohmann::json("ok") : nlohmann::json(nullptr);
        j["certificate_names"] = presented_names(conn->stream.native_tls());
        conn->stream.close();
    } else {
        // A connect failure is the network's; anything after it (TLS) happened on an open connection.
        bool connected = f.cls != rules::fault_class::upstream_connect;
        j["result"] = rules::to_string(f.cls);
        j["detail"] = f.detail;
        j["tcp"] = connected ? std::string("ok") : tcp_words(f.detail);
        j["tls"] = connected ? nlohmann::json(f.detail) : nlohmann::json(nullptr);
        j["certificate_names"] = presented;  // what a refused certificate says it is for
    }
    co_return answered(200, j);
}

}  // namespace dmz::proxy
