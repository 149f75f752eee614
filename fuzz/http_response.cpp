// Fuzz target: the HTTP/1.1 response head parser (dmz::http::parse_response), which reads
// what an upstream answers. Checks besides "no crash":
// - a parsed head: head_size within the input ending in CRLF CRLF, status 100..999,
//   views into its own bytes, clean field values; no body for HEAD, 1xx, 204 and 304;
//   a length body has a non-zero length; a close-delimited body never keeps the connection;
// - the head parses the same alone, and every proper prefix of it is need_more;
// - an error is final (a refused prefix means a refused whole);
// - the same bytes as the answer to GET and to HEAD agree on status, reason and fields.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "check.hpp"
#include "dmz/proxy/http/parser.hpp"

namespace {

using namespace dmz::http;
using dmz::fuzz::within;

std::string fields_summary(const response_head& h) {
    std::string s = std::to_string(h.status) + ' ' + std::string(h.reason) + ' ' + std::to_string(h.version_minor) +
                    ' ' + std::to_string(h.head_size);
    for (auto& f : h.fields) {
        s += '\n';
        s += f.name;
        s += ':';
        s += f.value;
        s += '#';
        s += std::to_string(static_cast<int>(f.id));
    }
    return s;
}

std::string summary(const response_head& h) {
    std::string s = fields_summary(h);
    s += "\nbody " + std::to_string(static_cast<int>(h.body)) + ' ' + std::to_string(h.content_length) + ' ' +
         std::to_string(h.keep_alive);
    for (auto& t : h.connection_tokens) s += "\nconn " + t;
    return s;
}

void check_done(std::string_view in, std::string_view method, const limits& lim, const response_head& h) {
    DMZ_FUZZ_CHECK(h.head_size >= 4 && h.head_size <= in.size());
    auto head = in.substr(0, h.head_size);
    DMZ_FUZZ_CHECK(head.starts_with("HTTP/1.") && head.ends_with("\r\n\r\n"));
    DMZ_FUZZ_CHECK(h.status >= 100 && h.status <= 999);
    DMZ_FUZZ_CHECK(h.version_minor == 0 || h.version_minor == 1);
    DMZ_FUZZ_CHECK(within(h.reason, head));
    for (unsigned char c : h.reason) DMZ_FUZZ_CHECK(c == '\t' || (c >= 0x20 && c != 0x7f));
    DMZ_FUZZ_CHECK(h.fields.size() <= lim.max_fields);
    for (auto& f : h.fields) {
        DMZ_FUZZ_CHECK(is_token(f.name) && within(f.name, head) && within(f.value, head));
        DMZ_FUZZ_CHECK(f.id == classify_field(f.name));
        for (unsigned char c : f.value) DMZ_FUZZ_CHECK(c == '\t' || (c >= 0x20 && c != 0x7f));
    }
    bool bodiless = method == "HEAD" || h.status < 200 || h.status == 204 || h.status == 304;
    if (bodiless) DMZ_FUZZ_CHECK(h.body == body_kind::none);
    DMZ_FUZZ_CHECK((h.body == body_kind::length) == (h.content_length > 0));
    if (h.body == body_kind::until_close) DMZ_FUZZ_CHECK(!h.keep_alive);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    dmz::fuzz::lcg rng(in);
    limits lim;
    response_head got[2];
    result res[2];
    const std::string_view methods[2] = {"GET", "HEAD"};
    for (int m = 0; m < 2; ++m) {
        parse_error err;
        res[m] = parse_response(in, methods[m], lim, got[m], err);
        if (res[m] == result::error) DMZ_FUZZ_CHECK(err.status == 502 && !err.code.empty() && !err.detail.empty());
        if (res[m] == result::need_more) DMZ_FUZZ_CHECK(size <= lim.max_head_bytes);
        if (res[m] == result::done) check_done(in, methods[m], lim, got[m]);

        auto k = rng.below(size + 1);
        response_head hp;
        parse_error ep;
        if (parse_response(in.substr(0, k), methods[m], lim, hp, ep) == result::error)
            DMZ_FUZZ_CHECK(res[m] == result::error);
    }
    if (res[0] == result::done && res[1] == result::done) DMZ_FUZZ_CHECK(fields_summary(got[0]) == fields_summary(got[1]));
    // The head is found the same way whatever the method: both need more, or neither.
    DMZ_FUZZ_CHECK((res[0] == result::need_more) == (res[1] == result::need_more));

    for (int m = 0; m < 2; ++m) {
        if (res[m] != result::done) continue;
        auto& h = got[m];
        auto expect = summary(h);
        response_head h2;
        parse_error e2;
        DMZ_FUZZ_CHECK(parse_response(in.substr(0, h.head_size), methods[m], lim, h2, e2) == result::done);
        DMZ_FUZZ_CHECK(summary(h2) == expect);
        for (std::size_t k : {h.head_size - 1, h.head_size / 2, rng.below(h.head_size)}) {
            response_head hp;
            parse_error ep;
            DMZ_FUZZ_CHECK(parse_response(in.substr(0, k), methods[m], lim, hp, ep) == result::need_more);
        }
        static response_head reused;
        DMZ_FUZZ_CHECK(parse_response(in, methods[m], lim, reused, e2) == result::done);
        DMZ_FUZZ_CHECK(summary(reused) == expect);
    }
    return 0;
}
