#include "dmz/rules/guards.hpp"

namespace dmz::rules {

void exchange_guard::cookie(std::string_view value) {
    if (contains_nocase(value, "x-beresource=") || contains_nocase(value, "x-anonresource-backend")) routing_cookie_ = true;
    if (path_has_prefix(target_.path, "/ecp") && contains_nocase(value, "securitytoken=")) strip_token_ = true;
}

std::optional<fault> exchange_guard::refusal() const {
    if (!rule_.exchange_guards) return std::nullopt;
    // The order the proxy has always checked them in: cookies, then the field, then the URI.
    if (routing_cookie_)
        return make_fault(fault_class::rule_denied, 403,
                          "refused by the Exchange template: a backend routing cookie (ProxyLogon shape)", rule_.name);
    if (rps_cat_field_)
        return make_fault(fault_class::rule_denied, 403,
                          "refused by the Exchange template: X-Rps-CAT from a client (ProxyShell shape)", rule_.name);
    if (contains_nocase(target_.decoded, "x-rps-cat"))
        return make_fault(fault_class::rule_denied, 403,
                          "refused by the Exchange template: X-Rps-CAT in the URI (ProxyShell shape)", rule_.name);
    return std::nullopt;
}

}  // namespace dmz::rules
