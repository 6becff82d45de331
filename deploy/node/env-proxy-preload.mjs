// Make Node's built-in fetch() honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY.
//
// Why: Node's fetch (undici inside Node) ignores the proxy environment variables, so a gateway
// such as @tencent-weixin/openclaw-weixin, which calls the global fetch, never reaches a forward
// proxy however HTTPS_PROXY is set. undici's EnvHttpProxyAgent reads those variables; installed
// as the global dispatcher it carries every fetch() of the process, the built-in one included.
// Node >= 24 can do the same without this file: NODE_USE_ENV_PROXY=1.
//
// Use: npm install undici@7 in this file's directory (undici 7 needs Node >= 20.18.1), then
//   NODE_OPTIONS="--import /path/to/env-proxy-preload.mjs" HTTPS_PROXY=http://127.0.0.1:8765 \
//   NODE_EXTRA_CA_CERTS=~/.mitmproxy/mitmproxy-ca-cert.pem <your gateway command>
import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";

setGlobalDispatcher(new EnvHttpProxyAgent());
