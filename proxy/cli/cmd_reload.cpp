// dmzproxy reload ADMIN-URL [--token-file F]: asks a running instance to reload its config
// through its admin endpoint, and exits non-zero (with the reason) when it refused.
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.hpp"

namespace dmz::cli {

namespace {

struct reload_cli {
    std::string url, token_file;
    double timeout = 30;
};

}  // namespace

/// POST /reload to an admin endpoint. Exit code as `dmzproxy reload`: 0 reloaded (the
/// message in `out`), 1 refused (the reason in `err`), 2 unreachable or not an admin URL.
int reload_instance(const std::string& url, const std::string& token, double timeout, std::string& out, std::string& err) {
    auto reply = admin_call(url, "POST", "/reload", token, timeout);
    if (reply.status == 0) {
        err = reply.error;
        return 2;
    }
    int status = reply.status;
    auto& body = reply.body;
    if (status == 200) {
        out = body.is_object() ? body.value("message", std::string("reloaded")) : std::string("reloaded");
        return 0;
    }
    std::string why = body.is_object() ? body.value("error", std::string()) : std::string();
    err = "refused (HTTP " + std::to_string(status) + ")" +
          (body.is_object() && body.contains("config_version")
               ? ", still running config version " + std::to_string(body["config_version"].get<int>())
               : std::string()) +
          ":\n" + why;
    return 1;
}

command add_reload(CLI::App& app) {
    auto o = std::make_shared<reload_cli>();
    auto* sub = app.add_subcommand("reload", "Reload a running instance's config through its admin endpoint (like SIGHUP, "
                                             "but waits for the answer: exit 1 and the reason when it is refused)");
    sub->add_option("url", o->url, "the instance's admin endpoint, e.g. http://127.0.0.1:9401")->required();
    sub->add_option("--token-file", o->token_file, "file holding the admin bearer token (the instance's admin_token_file)");
    sub->add_option("--timeout", o->timeout, "seconds to wait for the answer (default 30)")->check(CLI::Range(1.0, 3600.0));
    return [o]() -> int {
        std::string token;
        if (!o->token_file.empty()) {
            if (!read_token_file(o->token_file, token)) {
                std::cerr << "dmzproxy reload: cannot read " << o->token_file << "\n";
                return 2;
            }
        }
        std::string out, err;
        int rc = reload_instance(o->url, token, o->timeout, out, err);
        if (rc == 0) std::cout << out << "\n";
        else std::cerr << "dmzproxy reload: " << err << (err.empty() || err.back() == '\n' ? "" : "\n");
        return rc;
    };
}

}  // namespace dmz::cli
